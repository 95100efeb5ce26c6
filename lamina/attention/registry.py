"""Attention backends by name; `select_attention_backend` is what the engine calls at start."""

from __future__ import annotations

import torch

from lamina.attention.base import AttentionBackend
from lamina.attention.cpu_paged import CpuPagedAttentionBackend
from lamina.attention.exact import ExactAttentionBackend
from lamina.attention.online_softmax import OnlineSoftmaxBackend
from lamina.attention.torch_backend import TorchAttentionBackend
from lamina.kv.retention import RetentionAttention

_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: make a backend selectable by its `name` (and by "auto")."""
    _BACKENDS[cls.name] = cls
    return cls


def registered_attention_backends() -> dict[str, type[AttentionBackend]]:
    return dict(_BACKENDS)


def select_attention_backend(
    name: str = "auto",
    device: torch.device | str = "cpu",
    retention: type[RetentionAttention] | None = None,
) -> AttentionBackend:
    """An instance of the backend called `name`, or for "auto" the highest-priority backend
    available on `device` that runs the retention policy's attention kind."""
    device = torch.device(device)
    if name == "auto":
        # highest priority first, and `available` (which may build a kernel) only as needed
        ranked = sorted(_BACKENDS.values(), key=lambda c: c.priority, reverse=True)
        for cls in ranked:
            if cls.priority >= 0 and cls.supports(retention) and cls.available(device):
                return cls()
        raise ValueError(f"no attention backend runs on {device} with this retention policy")
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; accepted: auto, {', '.join(sorted(_BACKENDS))}"
        )
    cls = _BACKENDS[name]
    if not cls.available(device):
        why = cls.unavailable_reason(device)
        raise ValueError(
            f"attention backend {name!r} is not available on {device}" + (f": {why}" if why else "")
        )
    if not cls.supports(retention):
        kind = retention.__name__ if retention else "dense"
        raise ValueError(f"attention backend {name!r} does not implement {kind} attention")
    return cls()


for _builtin in (
    TorchAttentionBackend,
    OnlineSoftmaxBackend,
    ExactAttentionBackend,
    CpuPagedAttentionBackend,
):
    register_attention_backend(_builtin)
