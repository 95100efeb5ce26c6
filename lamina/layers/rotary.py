"""Rotary position embedding (Su et al., 2021) with context-extension schemes.

Each scheme only changes the inverse frequencies (and, for YaRN, scales cos/sin by an attention
factor); the rotation itself is the "rotate half" form of the Hugging Face checkpoints, whose q/k
weights are laid out for it (GGUF's interleaved layout is undone at load time). Frequencies are
computed with the same float32 operations as transformers' `ROPE_INIT_FUNCTIONS`, so they agree
bit for bit (tests/test_rope_scaling.py); cos/sin can differ in the last place, where torch's
vectorized and scalar cos differ.

Schemes (`RopeConfig.rope_type`), with d the rotary dimension and L0 `max_position_embeddings`:
  default  inv_freq_i = theta^(-2i/d).
  linear   inv_freq / factor (position interpolation).
  ntk      static NTK-aware scaling (bloc97): theta' = theta * alpha^(d/(d-2)), alpha = `alpha`
           or, if unset, `factor`. alpha = factor divides the lowest frequency by exactly
           `factor` (as linear would) while leaving the highest untouched. It equals
           transformers' "dynamic" with factor 1 at seq_len = alpha * L0. (CodeLlama's
           theta = 1e6 is simply "default" with another theta.)
  dynamic  transformers' dynamic NTK: theta(L) = theta * (factor*L/L0 - (factor-1))^(d/(d-2))
           for a sequence length L > L0, theta itself for L <= L0.
  yarn     YaRN (Peng et al., 2023): a per-frequency ramp between extrapolation and
           interpolation (`beta_fast`, `beta_slow`, `original_max_position_embeddings`,
           `truncate`), with cos/sin scaled by `attention_factor` (default 0.1*ln(factor) + 1,
           or the DeepSeek `mscale`/`mscale_all_dim` ratio).
  llama3   Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.

Dynamic NTK in a paged, continuously batched engine
---------------------------------------------------
The base depends on a sequence length, while cached keys are stored already rotated. Choices:
  * transformers: one base per forward from max(position_ids) + 1 of the whole batch, grown only.
    Cached keys keep the base they were rotated with while new queries use the current one, so
    q and k of one attention product disagree on the base (relative positions are no longer
    what RoPE encodes), and the result depends on the rest of the batch and on history.
  * vLLM: one fixed base, theta(L0 * factor), for every token of every sequence. Batch- and
    history-invariant, but short sequences no longer see the trained base.
  * lamina (this module): one base per sequence, fixed when the request is admitted, for the
    longest the sequence can get: rope_len = min(prompt + max_tokens - 1, max_model_len) tokens
    (the last generated token is never fed). Every q and k of the sequence uses theta(rope_len),
    so relative positions stay exact as the sequence grows; a sequence that fits in L0 keeps the
    trained base bit for bit; a prompt scored alone (max_tokens=1) is rotated exactly as
    transformers' single no-cache forward over it. The base is a function of the request alone,
    so the result does not depend on the batch, on chunked prefill, or on recompute after
    preemption; prefix-cache blocks are salted with rope_len, because keys rotated with another
    base are not interchangeable. (An earlier convention gave token p the base theta(p + 1), as
    transformers' token-by-token decoding does; keys and queries then mix bases and
    perplexity past 2 x L0 came out worse than with no scaling at all.)
The engine passes `rope_lens` (one length per token, 0 for the trained base); cos/sin come from a
table per length, built on first use and kept in a small LRU, so lookups stay exact and cheap.
Under StreamingLLM, positions are cache positions and no query spans more than sinks + window
keys, so rope_len is capped at that.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.rope_config import RopeConfig

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
# dynamic NTK: how many per-length cos/sin tables to keep (one per long request in flight)
DYNAMIC_TABLES = 16


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** _exponents(dim))


def ntk_theta(rope: RopeConfig, dim: int) -> float:
    """Static NTK-aware base: theta * alpha^(d/(d-2)), alpha = `alpha` or else `factor`."""
    alpha = rope.alpha if rope.alpha is not None else rope.factor
    return float(rope.theta * alpha ** (dim / (dim - 2)))


def dynamic_theta(rope: RopeConfig, dim: int, max_pos: int, seq_lens: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic-NTK base for int64 `seq_lens`, in float32 as transformers computes it
    when its seq_len is a tensor (lengths <= max_pos give the trained base)."""
    seq_lens = seq_lens.to(torch.int64)
    scale = (rope.factor * torch.clamp_min(seq_lens, max_pos) / max_pos) - (rope.factor - 1)
    # exactly the trained base up to max_pos (the formula could be off by an ulp there)
    scale = torch.where(seq_lens > max_pos, scale, torch.ones_like(scale))
    return rope.theta * scale ** (dim / (dim - 2))


def _dynamic_inv_freq(
    rope: RopeConfig, dim: int, max_pos: int, seq_lens: torch.Tensor
) -> torch.Tensor:
    """[T, dim/2] inverse frequencies, one row per token's sequence length."""
    theta = dynamic_theta(rope, dim, max_pos, seq_lens)
    return 1.0 / (theta[:, None] ** _exponents(dim)[None, :])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN, step for step as transformers' `_compute_yarn_parameters`."""
    base, factor = rope.theta, rope.factor
    old_len = rope.original_max_position_embeddings or max_pos
    if rope.attention_factor is not None:
        attention = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = _yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high frequency, kept as trained; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention


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


def rope_inv_freq(
    rope: RopeConfig, head_dim: int, max_pos: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling factor for a rope type.

    `seq_len` matters only for "dynamic" (the base for a sequence of that length; None means
    max_pos, i.e. the trained base), mirroring the `seq_len` of transformers' init functions.
    """
    dim = int(head_dim * rope.partial_rotary_factor)
    kind = rope.rope_type
    if kind == "default":
        return _default_inv_freq(rope.theta, dim), 1.0
    if kind == "linear":
        return _default_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if kind == "ntk":
        return _default_inv_freq(ntk_theta(rope, dim), dim), 1.0
    if kind == "dynamic":
        length = torch.tensor([max_pos if seq_len is None else seq_len])
        return _dynamic_inv_freq(rope, dim, max_pos, length)[0], 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, dim, max_pos)
    if kind == "llama3":
        return _llama3_inv_freq(rope, dim, max_pos), 1.0
    raise ValueError(f"rope_type {kind!r} is not supported; accepted: {', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flat [tokens, heads, head_dim] q and k at arbitrary per-token positions."""

    inv_freq: torch.Tensor  # buffer, registered in __init__

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rope = config.rope
        self.max_pos = config.max_position_embeddings
        self.dynamic = config.rope.rope_type == "dynamic"
        self.dim = int(config.head_dim * config.rope.partial_rotary_factor)
        # for dynamic NTK: the trained base (the base of any sequence of at most max_pos tokens)
        inv_freq, self.attention_scaling = rope_inv_freq(config.rope, config.head_dim, self.max_pos)
        self.rotary_dim = inv_freq.numel() * 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos, self._sin = self._table(inv_freq, self.max_pos)
        # dynamic NTK: rope_len -> (cos, sin) tables with the base theta(rope_len), LRU
        self._dynamic_tables: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # the last `cos_sin` answer: (positions, rope_lens, dtype, cos, sin)
        self._memo: (
            tuple[torch.Tensor, torch.Tensor | None, torch.dtype, torch.Tensor, torch.Tensor] | None
        ) = None

    def _table(self, inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin rows for positions 0 .. length-1, [length, rotary_dim]."""
        angles = torch.arange(length, dtype=torch.int64).to(torch.float32)[:, None] * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def _base_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            self._cos, self._sin = self._table(self.inv_freq, max(needed, 2 * self._cos.shape[0]))
        return self._cos[positions], self._sin[positions]

    def _dynamic_rows(
        self, positions: torch.Tensor, rope_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the table whose base is theta(rope_len) (the trained one up to max_pos)."""
        if rope_len <= self.max_pos:
            return self._base_rows(positions)
        needed = max(rope_len, int(positions.max()) + 1 if positions.numel() else 0)
        table = self._dynamic_tables.pop(rope_len, None)
        if table is None or table[0].shape[0] < needed:
            theta_len = torch.tensor([rope_len])
            inv_freq = _dynamic_inv_freq(self.rope, self.dim, self.max_pos, theta_len)[0]
            table = self._table(inv_freq, needed)
        self._dynamic_tables[rope_len] = table  # most recently used last
        while len(self._dynamic_tables) > DYNAMIC_TABLES:
            self._dynamic_tables.popitem(last=False)
        return table[0][positions], table[1][positions]

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, rope_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for the given positions, [T, 1, rotary_dim].

        rope_lens: optional [T] int tensor, read by dynamic NTK only: the sequence length whose
        base each token uses (see the module docstring); None or values <= max_pos mean the
        trained base.

        Every layer asks with the same tensors in one forward pass: the last answer is kept and
        reused (a decode step would otherwise repeat the lookup 30 times)."""
        memo = self._memo
        if memo is not None and memo[0] is positions and memo[1] is rope_lens and memo[2] == dtype:
            return memo[3], memo[4]
        if self.dynamic and rope_lens is not None and bool((rope_lens > self.max_pos).any()):
            lengths = torch.unique(rope_lens).tolist()
            if len(lengths) == 1:
                cos, sin = self._dynamic_rows(positions, lengths[0])
            else:
                cos = torch.empty(positions.numel(), self.rotary_dim)
                sin = torch.empty_like(cos)
                for length in lengths:
                    rows = rope_lens == length
                    cos[rows], sin[rows] = self._dynamic_rows(positions[rows], length)
        else:
            cos, sin = self._base_rows(positions)
        cos, sin = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)
        self._memo = (positions, rope_lens, dtype, cos, sin)
        return cos, sin

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        rope_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hk, D] for tokens at `positions` [T] (`rope_lens`: as
        in `cos_sin`)."""
        cos, sin = self.cos_sin(positions, q.dtype, rope_lens)
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
