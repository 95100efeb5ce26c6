"""`lamina convert`: GGUF -> Hugging Face folder that transformers and lamina both load."""

from __future__ import annotations

import json

import pytest
import torch

from lamina import LLM
from lamina.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    assert main(["convert", str(smollm2_path), str(out)]) == 0
    return out


def test_converted_folder_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] is True


def test_transformers_loads_converted_with_same_logits(converted, hf_smollm2, smollm2_llm):
    transformers = pytest.importorskip("transformers")
    tok_gguf, model_gguf = hf_smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    text = "Converting a GGUF file back to safetensors keeps the model intact: 東京 🍕"
    ids = tok.encode(text)
    assert ids == tok_gguf.encode(text)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
        ref = model_gguf(torch.tensor([ids])).logits[0]
    # transformers on the converted folder == transformers on the original GGUF
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # and lamina on the GGUF agrees with both
    torch.testing.assert_close(smollm2_llm.engine.prompt_logits(ids), ref, atol=2e-3, rtol=0)


def test_lamina_loads_converted_identically(converted, smollm2_llm):
    llm = LLM(str(converted), dtype="float32", max_model_len=256)
    ids = smollm2_llm.get_tokenizer().encode("The same weights give the same logits.")
    assert llm.get_tokenizer().encode("The same weights give the same logits.") == ids
    torch.testing.assert_close(
        llm.engine.prompt_logits(ids), smollm2_llm.engine.prompt_logits(ids), atol=0, rtol=0
    )
