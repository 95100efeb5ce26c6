"""Configuration dataclasses: one per concern, built once from the checkpoint and the user's flags.

`ModelConfig` is the single source of truth for the architecture. It is parsed from a Hugging
Face `config.json` dict or from GGUF metadata (see `loading/gguf.py`), validated here, and then
read by every layer; nothing downstream re-parses the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    # HF `architectures[0]` / `model_type` -> family switches
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def auto_dtype() -> torch.dtype:
    """bfloat16 where the CPU has native bf16 kernels (AVX512-BF16 / AMX): measured here it
    decodes SmolLM2 at twice the float32 speed and batches far better; float32 elsewhere."""
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype:
    """Turn a user's dtype name into a torch dtype, or explain which names are accepted.
    "auto" (or None) means `default`, else `auto_dtype()`."""
    if dtype is None or dtype == "auto":
        return default or auto_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; accepted: auto, {', '.join(sorted(set(DTYPES)))}"
        )
    return DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: the base and, optionally, a context-extension scheme.

    The formulas of each `rope_type` are in `lamina/layers/rotary.py`. Field names and defaults
    are transformers' `rope_parameters` keys (`theta` is its `rope_theta`), so a checkpoint's
    dict maps onto this one-to-one.
    """

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | ntk | dynamic | yarn | llama3
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None  # llama3, yarn (None: max positions)
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # ntk-aware (static): theta * alpha^(d/(d-2)); None means alpha = factor
    alpha: float | None = None
    partial_rotary_factor: float = 1.0

    # Fields a user may set per rope_type (besides rope_type, rope_theta, partial_rotary_factor).
    USER_FIELDS = {
        "default": (),
        "linear": ("factor",),
        "dynamic": ("factor",),
        "ntk": ("alpha", "factor"),
        "yarn": (
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> RopeConfig:
        """Read RoPE settings in either transformers layout (4.x `rope_theta`/`rope_scaling`,
        5.x `rope_parameters`)."""
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        known = {
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
            "alpha",
            "partial_rotary_factor",
        }
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        if "partial_rotary_factor" not in kwargs and "partial_rotary_factor" in cfg:
            kwargs["partial_rotary_factor"] = cfg["partial_rotary_factor"]
        orig = kwargs.get("original_max_position_embeddings")
        if (
            rope_type == "yarn"
            and "factor" not in kwargs
            and orig
            and "max_position_embeddings" in cfg
        ):
            # transformers (DeepSeek-V3 style): the factor is the ratio of the two lengths
            kwargs["factor"] = cfg["max_position_embeddings"] / orig
        return RopeConfig(theta=theta, rope_type=str(rope_type), **kwargs)

    @classmethod
    def from_user(cls, spec: str | dict[str, Any], base: RopeConfig) -> RopeConfig:
        """Override the checkpoint's RoPE from a user's JSON object or dict, as given to a flag
        like `--rope-scaling '{"rope_type": "dynamic", "factor": 4}'`.

        The checkpoint's theta, partial_rotary_factor and (for yarn and llama3)
        original_max_position_embeddings carry over unless given: they describe the model, not
        the scheme. The other fields of the checkpoint's scheme carry over only when the
        rope_type stays the same. Raises ValueError
        naming the accepted types and fields for anything unknown, missing or out of range.
        """
        import dataclasses
        import json

        example = '{"rope_type": "dynamic", "factor": 4}'
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"rope scaling {spec!r} is not valid JSON ({e.msg}); e.g. {example}"
                ) from None
        if not isinstance(spec, dict):
            raise ValueError(f"rope scaling must be a JSON object, e.g. {example}; got {spec!r}")
        given = dict(spec)
        types = ", ".join(cls.USER_FIELDS)
        kinds = {given.pop(k) for k in ("rope_type", "type") if k in given}
        if len(kinds) != 1:
            raise ValueError(
                f"rope scaling needs one rope_type (accepted: {types}); e.g. {example}"
            )
        kind = kinds.pop()
        if kind not in cls.USER_FIELDS:
            raise ValueError(f"unknown rope_type {kind!r}; accepted: {types}")
        allowed = ("rope_theta", "partial_rotary_factor", *cls.USER_FIELDS[kind])
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(
                f"rope_type {kind!r} does not take {unknown}; accepted fields: "
                f"rope_type, {', '.join(allowed)}"
            )
        for name, value in given.items():
            cls._check_user_value(name, value)
        if kind in ("linear", "dynamic", "yarn", "llama3") and "factor" not in given:
            raise ValueError(f"rope_type {kind!r} needs a factor (a number >= 1); e.g. {example}")
        if kind == "ntk" and not {"alpha", "factor"} & set(given):
            raise ValueError("rope_type 'ntk' needs an alpha or a factor (a number >= 1)")
        values = {("theta" if k == "rope_theta" else k): v for k, v in given.items()}
        if kind == "ntk" and "alpha" not in values:
            values["alpha"] = None  # a new factor must not be shadowed by the checkpoint's alpha
        start = base
        if kind != base.rope_type:
            uses_orig = "original_max_position_embeddings" in cls.USER_FIELDS[kind]
            start = cls(
                theta=base.theta,
                partial_rotary_factor=base.partial_rotary_factor,
                original_max_position_embeddings=base.original_max_position_embeddings
                if uses_orig
                else None,
            )
        out = dataclasses.replace(start, rope_type=kind, **values)
        if kind == "yarn" and out.beta_fast < out.beta_slow:
            raise ValueError(f"beta_fast={out.beta_fast} must be >= beta_slow={out.beta_slow}")
        if kind == "llama3" and out.high_freq_factor <= out.low_freq_factor:
            raise ValueError(
                f"high_freq_factor={out.high_freq_factor} must be > "
                f"low_freq_factor={out.low_freq_factor}"
            )
        return out

    @staticmethod
    def _check_user_value(name: str, value: Any) -> None:
        """Type and range of one user-given field; the message names the accepted values."""
        if name == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"truncate must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")
        if name == "original_max_position_embeddings":
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        elif name in ("factor", "alpha"):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        elif name == "partial_rotary_factor":
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        elif not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number, got {value!r}")

    def to_hf(self, head_dim: int | None = None) -> dict[str, Any]:
        """The `rope_parameters` dict transformers 5.x writes (also valid as 4.x `rope_scaling`).

        transformers has no static "ntk"; with `head_dim` it is written as what it is, "default"
        with the scaled theta (same frequencies), else as lamina's own {"rope_type": "ntk"}.
        """
        kind = self.rope_type
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": kind}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if kind == "ntk":
            alpha = self.alpha if self.alpha is not None else self.factor
            if head_dim is None:
                return {**out, "alpha": alpha}
            dim = int(head_dim * self.partial_rotary_factor)
            return {
                **out,
                "rope_type": "default",
                "rope_theta": self.theta * alpha ** (dim / (dim - 2)),
            }
        if kind != "default":
            out["factor"] = self.factor
        if kind == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if kind == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            optional = ("original_max_position_embeddings", "attention_factor", "mscale")
            for name in (*optional, "mscale_all_dim"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one LLaMA-family checkpoint; switches cover Llama 1-3, Mistral, Qwen2."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral's trained window (informational)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the checkpoint's own dtype

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {self.model_type!r}; lamina runs "
                f"{sorted(SUPPORTED_MODEL_TYPES)} (architectures {sorted(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; accepted: silu")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict, naming what is missing or unsupported."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {archs[0]!r}; "
                f"accepted: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if model_type is None and archs:
            model_type = SUPPORTED_ARCHITECTURES[archs[0]]
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required fields {missing}")
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            model_type=str(model_type),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            sliding_window=cfg.get("sliding_window")
            if cfg.get("use_sliding_window", True)
            else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` that transformers (4.x and 5.x) loads."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        rope = self.rope.to_hf()
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope.theta,
            "rope_scaling": rope if self.rope.rope_type != "default" else None,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None),
            "torch_dtype": self.torch_dtype or "float32",
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        return out


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry. The number of blocks is derived from a memory budget."""

    block_size: int = 16
    num_blocks: int | None = None  # explicit count wins over the byte budget
    kv_cache_bytes: int = 1 << 30
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "int8" (per-token-per-head scales)
    # StreamingLLM (Xiao et al., 2023): keep the first `attention_sinks` tokens and the last
    # `sliding_window` tokens of each request; blocks that leave the window are freed.
    attention_sinks: int = 0
    sliding_window: int | None = None
    # H2O (Zhang et al., 2023): keep the `h2o_recent` newest tokens and the `h2o_heavy` tokens
    # with the largest accumulated attention; off unless both are set.
    h2o_heavy: int | None = None
    h2o_recent: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; accepted: auto, int8"
            )
        if self.attention_sinks < 0:
            raise ValueError(f"attention_sinks must be >= 0, got {self.attention_sinks}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError("attention_sinks needs sliding_window (StreamingLLM keeps both)")
        if (self.h2o_heavy is None) != (self.h2o_recent is None):
            raise ValueError("H2O needs both h2o_heavy and h2o_recent (token counts)")
        if self.h2o_heavy is not None and (self.h2o_heavy < 0 or self.h2o_recent < 1):
            raise ValueError(
                f"h2o_heavy must be >= 0 and h2o_recent >= 1, got {self.h2o_heavy}, "
                f"{self.h2o_recent}"
            )
        if self.h2o_heavy is not None and self.sliding_window is not None:
            raise ValueError("choose one KV retention policy: StreamingLLM or H2O, not both")

    @property
    def h2o(self) -> bool:
        return self.h2o_heavy is not None

    @property
    def streaming(self) -> bool:
        return self.sliding_window is not None


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of the engine's scheduler."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
