"""EngineConfig is the one spelling of every engine setting: `LLM(...)` keywords, the `lamina
run/chat/serve/ppl` flags and their help come from its fields. Model-free and fast."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from lamina.cli import build_parser, main
from lamina.config import CacheConfig, ModelConfig, SchedulerConfig
from lamina.engine_config import UNBOUNDED_MAX_MODEL_LEN, EngineConfig, resolve_max_model_len
from lamina.server.cli import add_serve_args

LLM_KWARGS = {
    "model",
    "dtype",
    "block_size",
    "num_kv_blocks",
    "kv_cache_bytes",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "rope_scaling",
    "kv_cache_dtype",
    "attention_sinks",
    "guided_decoding_backend",
    "speculative_config",
    "sliding_window",
    "h2o_heavy",
    "h2o_recent",
    "h2o_cache_positions",
    "quantization",
    "pack_weights",
    "attention_backend",
    "batch_invariant",
    "seed",
    "tokenizer",
    "skip_tokenizer_init",
    "enforce_eager",
    "gpu_memory_utilization",
}

# The flags `lamina run/chat/serve` had before EngineConfig, with their defaults (dest: default).
LEGACY_FLAGS = {
    "--model": None,
    "-m": None,
    "--dtype": "auto",
    "--max-model-len": None,
    "--block-size": 16,
    "--kv-cache-bytes": 1 << 30,
    "--max-num-seqs": 64,
    "--max-num-batched-tokens": 2048,
    "--no-prefix-caching": True,  # dest enable_prefix_caching
    "--no-pack-weights": True,  # dest pack_weights
    "--kv-cache-dtype": "auto",
    "--attention-sinks": 0,
    "--sliding-window": None,
    "--h2o-heavy": None,
    "--h2o-recent": None,
    "--h2o-cache-positions": False,
    "--rope-scaling": None,
    "--quantization": None,
}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p


def test_fields_are_the_llm_keywords_and_all_have_help():
    fields = dataclasses.fields(EngineConfig)
    assert {f.name for f in fields} == LLM_KWARGS
    for f in fields:
        assert f.metadata.get("help", "").strip(), f"{f.name} has no help"


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_legacy_spellings_and_defaults(command):
    p = _subparser(command)
    options = p._option_string_actions
    for flag, default in LEGACY_FLAGS.items():
        assert flag in options, f"`lamina {command}` lost {flag}"
        assert options[flag].default == default, flag
    assert options["-m"] is options["--model"]
    assert options["--kv-cache-dtype"].choices == ["auto", "int8"]
    assert options["--quantization"].choices == ["gguf"]
    assert options["--attention-backend"].default == "auto"


def test_serve_help_shows_engine_flags():
    text = _serve_parser().format_help()
    for flag in ("--no-prefix-caching", "--max-model-len", "--attention-backend", "--port"):
        assert flag in text


def test_ppl_keeps_its_three_engine_flags():
    options = _subparser("ppl")._option_string_actions
    assert {"--model", "-m", "--dtype", "--rope-scaling"} <= set(options)
    assert "--block-size" not in options  # only the fields it asked for


def test_no_flags_give_the_default_config():
    args = _subparser("run").parse_args(["hello"])
    assert EngineConfig.from_cli_args(args) == EngineConfig()


@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        (["-m", "x.gguf", "--dtype", "float32"], {"model": "x.gguf", "dtype": "float32"}),
        (
            ["--block-size", "8", "--num-kv-blocks", "4", "--kv-cache-bytes", "4096"],
            {"block_size": 8, "num_kv_blocks": 4, "kv_cache_bytes": 4096},
        ),
        (
            ["--max-model-len", "128", "--max-num-seqs", "2", "--max-num-batched-tokens", "64"],
            {"max_model_len": 128, "max_num_seqs": 2, "max_num_batched_tokens": 64},
        ),
        (
            ["--no-prefix-caching", "--no-pack-weights", "--kv-cache-dtype", "int8"],
            {"enable_prefix_caching": False, "pack_weights": False, "kv_cache_dtype": "int8"},
        ),
        (
            ["--attention-sinks", "4", "--sliding-window", "64"],
            {"attention_sinks": 4, "sliding_window": 64},
        ),
        (
            ["--h2o-heavy", "8", "--h2o-recent", "8", "--h2o-cache-positions"],
            {"h2o_heavy": 8, "h2o_recent": 8, "h2o_cache_positions": True},
        ),
        (
            ["--rope-scaling", '{"rope_type": "linear", "factor": 2}', "--quantization", "gguf"],
            {"rope_scaling": '{"rope_type": "linear", "factor": 2}', "quantization": "gguf"},
        ),
        (["--attention-backend", "torch"], {"attention_backend": "torch"}),
    ],
)
@pytest.mark.parametrize("command", ["run", "serve"])
def test_flags_round_trip(argv, kwargs, command):
    if command == "serve":
        args = _serve_parser().parse_args(argv)
    else:
        args = _subparser("run").parse_args([*argv, "prompt"])
    assert EngineConfig.from_cli_args(args) == EngineConfig(**kwargs)


def test_from_cli_args_overrides_and_only():
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p, only=["model", "dtype"])
    config = EngineConfig.from_cli_args(p.parse_args(["-m", "a"]), max_model_len=33)
    assert config == EngineConfig(model="a", max_model_len=33)
    with pytest.raises(ValueError, match=r"no engine field\(s\) \['modle'\]; accepted: "):
        EngineConfig.add_cli_args(argparse.ArgumentParser(), only=["modle"])


def test_unknown_key_lists_the_accepted_ones():
    with pytest.raises(TypeError) as err:
        EngineConfig.from_kwargs(model=None, blok_size=8)
    msg = str(err.value)
    assert "['blok_size']" in msg
    assert "accepted: " + ", ".join(sorted(LLM_KWARGS)) in msg


def test_llm_rejects_unknown_key_before_loading():
    from lamina import LLM

    with pytest.raises(TypeError, match=r"\['max_seqs'\].*accepted: attention_backend, "):
        LLM("/no/such/model", max_seqs=4)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model": 3}, ["model=3"]),
        ({"dtype": "float8"}, ["dtype", "'float8'", "accepted"]),
        ({"block_size": 0}, ["block_size=0", ">= 1"]),
        ({"block_size": "16"}, ["block_size='16'", "integer"]),
        ({"num_kv_blocks": 0}, ["num_kv_blocks=0", ">= 1 or None"]),
        ({"kv_cache_bytes": -1}, ["kv_cache_bytes=-1", ">= 1"]),
        ({"max_model_len": 0}, ["max_model_len=0", ">= 1"]),
        ({"max_num_seqs": 0}, ["max_num_seqs=0", ">= 1"]),
        ({"max_num_batched_tokens": 0}, ["max_num_batched_tokens=0", ">= 1"]),
        ({"enable_prefix_caching": "no"}, ["enable_prefix_caching='no'", "True or False"]),
        ({"rope_scaling": "{bad"}, ["rope_scaling=", "JSON"]),
        ({"rope_scaling": {"rope_type": "warp"}}, ["rope_scaling=", "'warp'", "accepted"]),
        ({"kv_cache_dtype": "fp8"}, ["kv_cache_dtype", "'fp8'", "accepted: auto, int8"]),
        ({"attention_sinks": -1}, ["attention_sinks=-1", ">= 0"]),
        ({"sliding_window": 0}, ["sliding_window=0", ">= 1"]),
        ({"attention_sinks": 4}, ["attention_sinks=4", "sliding_window=None"]),
        ({"h2o_heavy": -1, "h2o_recent": 4}, ["h2o_heavy=-1", ">= 0"]),
        ({"h2o_heavy": 4}, ["h2o_recent=None", "h2o_heavy=4"]),
        ({"h2o_cache_positions": True}, ["h2o_cache_positions", "h2o_heavy"]),
        (
            {"sliding_window": 8, "h2o_heavy": 4, "h2o_recent": 4},
            ["sliding_window=8", "h2o_heavy=4", "not both"],
        ),
        ({"quantization": "q4"}, ["unknown quantization 'q4'", "accepted: None, gguf"]),
        ({"pack_weights": 1}, ["pack_weights=1", "True or False"]),
        ({"attention_backend": ""}, ["attention_backend=''", "name"]),
    ],
)
def test_validation_errors_name_field_value_and_accepted(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words[0])) as err:
        EngineConfig(**kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_accepts_what_llm_accepted():
    import torch

    yarn = {"rope_type": "yarn", "factor": 4}
    a = EngineConfig(model="m", dtype=torch.bfloat16, rope_scaling=yarn)
    assert a.dtype is torch.bfloat16
    assert a.rope_scaling == yarn
    b = EngineConfig(dtype="fp16", attention_sinks=4, sliding_window=64)
    streaming = b.cache_config()
    assert (b.dtype, streaming.attention_sinks, streaming.sliding_window) == ("fp16", 4, 64)
    c = EngineConfig(h2o_heavy=0, h2o_recent=1, h2o_cache_positions=True)
    h2o = c.cache_config()
    assert (h2o.h2o_heavy, h2o.h2o_recent, h2o.h2o_cache_positions) == (0, 1, True)


def test_replace_keeps_the_rest():
    base = EngineConfig(model="m", block_size=8)
    assert base.replace(max_num_seqs=2) == EngineConfig(model="m", block_size=8, max_num_seqs=2)
    with pytest.raises(TypeError, match="blocksize"):
        base.replace(blocksize=2)


def test_derived_configs():
    config = EngineConfig(
        block_size=8,
        num_kv_blocks=5,
        kv_cache_bytes=1 << 20,
        kv_cache_dtype="int8",
        h2o_heavy=2,
        h2o_recent=3,
        max_num_seqs=7,
        max_num_batched_tokens=99,
    )
    assert config.cache_config() == CacheConfig(
        block_size=8,
        num_blocks=5,
        kv_cache_bytes=1 << 20,
        kv_cache_dtype="int8",
        h2o_heavy=2,
        h2o_recent=3,
    )
    assert config.scheduler_config(123) == SchedulerConfig(
        max_num_seqs=7, max_num_batched_tokens=99, max_model_len=123
    )


def _model_config(rope_scaling: dict | None = None) -> ModelConfig:
    cfg = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 1000,
    }
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return ModelConfig.from_hf(cfg)


def test_resolve_max_model_len():
    plain = _model_config()
    assert resolve_max_model_len(EngineConfig(), plain, cache_tokens=5000) == 1000
    assert resolve_max_model_len(EngineConfig(), plain, cache_tokens=300) == 300
    assert resolve_max_model_len(EngineConfig(max_model_len=77), plain, 300) == 77
    streaming = EngineConfig(sliding_window=16)
    assert resolve_max_model_len(streaming, plain, 300) == UNBOUNDED_MAX_MODEL_LEN
    h2o = EngineConfig(h2o_heavy=4, h2o_recent=4)
    assert resolve_max_model_len(h2o, plain, 300) == UNBOUNDED_MAX_MODEL_LEN
    # a user's RoPE override grows the default by its factor; the checkpoint's own does not
    scaled = _model_config({"rope_type": "linear", "factor": 4.0})
    user = EngineConfig(rope_scaling={"rope_type": "linear", "factor": 4})
    assert resolve_max_model_len(user, scaled, 10**6) == 4000
    assert resolve_max_model_len(EngineConfig(), scaled, 10**6) == 1000


def test_cli_reports_a_bad_flag_before_loading(capsys):
    assert main(["run", "--block-size", "0", "hello"]) == 2
    assert "block_size=0" in capsys.readouterr().err
