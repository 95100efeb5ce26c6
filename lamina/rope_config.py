"""RoPE settings of a checkpoint or of a user's override: the base and the context-extension
scheme, read from either transformers layout and validated once. The formulas live in
`lamina/layers/rotary.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


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
    USER_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
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
