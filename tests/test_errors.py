"""Bad input gets a clear error that names the problem and what is accepted."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from lamina import LLM, SamplingParams
from lamina.config import parse_dtype


@pytest.fixture
def tiny_copy(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("llama_gqa")
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    return LLM(str(folder), dtype="float32", max_model_len=64)


def _edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_empty_prompt(tiny_llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_llm.generate("", use_tqdm=False)
    tiny_llm.engine.block_manager.check_all_free()


def test_prompt_longer_than_context(tiny_llm):
    with pytest.raises(ValueError, match=r"has 80 tokens .* max_model_len=64"):
        tiny_llm.generate({"prompt_token_ids": [5] * 80}, use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_token_ids_outside_vocab(tiny_llm):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        tiny_llm.generate({"prompt_token_ids": [5, 999]}, use_tqdm=False)


def test_failed_batch_leaves_no_request_behind(tiny_llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        tiny_llm.generate([{"prompt_token_ids": [5, 6]}, ""], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()
    tiny_llm.engine.block_manager.check_all_free()


def test_unknown_architecture(tiny_copy):
    _edit_config(tiny_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'.*accepted"):
        LLM(str(tiny_copy))


def test_missing_tensor(tiny_copy):
    weights = load_file(str(tiny_copy / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tiny_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
        LLM(str(tiny_copy))


def test_wrong_shape(tiny_copy):
    _edit_config(tiny_copy, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp\..*has shape \(\d+, \d+\), the config implies"):
        LLM(str(tiny_copy))


def test_missing_weights_and_config(tmp_path, tiny_copy):
    with pytest.raises(ValueError, match=r"no config\.json"):
        LLM(str(tmp_path / "model" / ".."))  # a folder without config.json
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        LLM(str(tiny_copy))


def test_model_not_found():
    with pytest.raises(FileNotFoundError, match=r"neither a folder nor a file.*hub id"):
        LLM("someorg/some-model")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        LLM(str(bad))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        LLM(str(fake))


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'; accepted"):
        parse_dtype("float8")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid"):
        SamplingParams(**kwargs)


def test_cache_too_small_for_context(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=256"):
        LLM(str(folder), num_kv_blocks=2, block_size=16, max_model_len=256)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("num_hidden_layers", "two", "num_hidden_layers='two' is not an integer"),
        ("hidden_size", 0, "hidden_size=0 must be >= 1"),
        ("num_key_value_heads", 1.5, "num_key_value_heads=1.5 is not an integer"),
        ("rms_norm_eps", -1, "rms_norm_eps=-1 must be a number > 0"),
    ],
)
def test_a_bad_config_field_is_named(field, value, words):
    from lamina.config import ModelConfig

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    with pytest.raises(ValueError, match=re.escape(words)):
        ModelConfig.from_hf({**cfg, field: value})
