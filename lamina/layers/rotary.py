"""Rotary position embedding (Su et al., 2021) with context-extension schemes.

Each scheme only changes the inverse frequencies (and, for some, a scaling of cos/sin); the
rotation itself is the "rotate half" form of the Hugging Face checkpoints, whose q/k weights are
laid out for it (GGUF's interleaved layout is undone at load time).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lamina.config import ModelConfig, RopeConfig


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    inv_freq = _default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings or max_pos
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling factor for a rope type."""
    dim = int(head_dim * rope.partial_rotary_factor)
    if rope.rope_type == "default":
        return _default_inv_freq(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return _default_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, dim, max_pos), 1.0
    raise ValueError(
        f"rope_type {rope.rope_type!r} is not supported; accepted: default, linear, llama3"
    )


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flat [tokens, heads, head_dim] q and k at arbitrary per-token positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        inv_freq, self.attention_scaling = rope_inv_freq(
            config.rope, config.head_dim, config.max_position_embeddings
        )
        self.rotary_dim = inv_freq.numel() * 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._build_cache(config.max_position_embeddings)

    def _build_cache(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos() * self.attention_scaling
        self._sin = emb.sin() * self.attention_scaling

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for the given positions, [T, 1, rotary_dim], grown on demand."""
        assert self._cos is not None and self._sin is not None
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            self._build_cache(max(needed, 2 * self._cos.shape[0]))
        return (
            self._cos[positions].to(dtype).unsqueeze(1),
            self._sin[positions].to(dtype).unsqueeze(1),
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, cos, sin, self.rotary_dim), apply_rotary(
            k, cos, sin, self.rotary_dim
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first `rotary_dim` channels of each head."""
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
