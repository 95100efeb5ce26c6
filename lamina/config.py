"""Configuration dataclasses: one per concern, built once from the checkpoint and the user's flags.

`ModelConfig` is the single source of truth for the architecture. It is parsed from a Hugging
Face `config.json` dict or from GGUF metadata (see `formats/gguf.py`), validated here, and then
read by every layer; nothing downstream re-parses the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lamina.rope_config import RopeConfig

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
        heads = _size(cfg, "num_attention_heads")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        hidden = _size(cfg, "hidden_size")
        return ModelConfig(
            model_type=str(model_type),
            vocab_size=_size(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_size(cfg, "intermediate_size"),
            num_hidden_layers=_size(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_size(cfg, "num_key_value_heads", heads),
            head_dim=_size(cfg, "head_dim", hidden // heads),
            max_position_embeddings=_size(cfg, "max_position_embeddings", 2048),
            rms_norm_eps=_positive_float(cfg, "rms_norm_eps", 1e-6),
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


def _size(cfg: dict[str, Any], name: str, default: int | None = None) -> int:
    """An integer >= 1 from config.json (`default` when absent or null), or a ValueError
    naming the field and its value."""
    value = cfg.get(name)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"config.json field {name}={value!r} is not an integer")
    if value < 1:
        raise ValueError(f"config.json field {name}={value!r} must be >= 1")
    return int(value)


def _positive_float(cfg: dict[str, Any], name: str, default: float) -> float:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"config.json field {name}={value!r} must be a number > 0")
    return float(value)


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
    # H2O positions: False keeps each token's true position (the paper); True assigns positions
    # by rank among the kept tokens, as StreamingLLM does, so lengths past the trained context
    # never show the model an unseen position.
    h2o_cache_positions: bool = False

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
            raise ValueError(
                f"attention_sinks={self.attention_sinks} needs sliding_window (StreamingLLM "
                "keeps both); got sliding_window=None"
            )
        if (self.h2o_heavy is None) != (self.h2o_recent is None):
            raise ValueError(
                "H2O needs both h2o_heavy and h2o_recent (token counts); got "
                f"h2o_heavy={self.h2o_heavy}, h2o_recent={self.h2o_recent}"
            )
        if (
            self.h2o_heavy is not None
            and self.h2o_recent is not None
            and (self.h2o_heavy < 0 or self.h2o_recent < 1)
        ):
            raise ValueError(
                f"h2o_heavy must be >= 0 and h2o_recent >= 1, got {self.h2o_heavy}, "
                f"{self.h2o_recent}"
            )
        if self.h2o_cache_positions and self.h2o_heavy is None:
            raise ValueError(
                "h2o_cache_positions needs H2O (h2o_heavy and h2o_recent); got "
                "h2o_cache_positions=True without them"
            )
        if self.h2o_heavy is not None and self.sliding_window is not None:
            raise ValueError(
                "choose one KV retention policy: StreamingLLM (sliding_window="
                f"{self.sliding_window}) or H2O (h2o_heavy={self.h2o_heavy}), not both"
            )

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
