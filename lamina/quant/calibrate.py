"""Calibration: per-linear input statistics from float forward passes over calibration tokens.

Forward pre-hooks on every `Linear` of the decoder layers see exactly what each matmul
multiplies. Per input channel they keep max |x| (SmoothQuant) and mean |x| (AWQ), and, when
asked, a strided subsample of whole rows (AWQ's output-error search needs real activations; a
stride spreads the rows over all calibration text instead of its first sequence).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import KVCache
from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM


class TextEncoder(Protocol):
    """What calibration needs of a tokenizer (lamina.loading.tokenizer.Tokenizer has it)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class ActStats:
    """Input statistics of one linear over all calibration tokens."""

    absmax: torch.Tensor  # [K] max |x_j|
    abssum: torch.Tensor  # [K] sum |x_j| (float64 to not lose small rows)
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()

    @property
    def samples(self) -> torch.Tensor:
        """[T, K] float32 rows kept (empty when rows were not collected)."""
        if not self.rows:
            return torch.empty(0, self.absmax.numel())
        return torch.cat(self.rows)


@torch.inference_mode()
def forward_hidden(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Final hidden states [len(ids), hidden] of one sequence through a throwaway paged KV cache
    (no engine needed: calibration and tests drive the model directly)."""
    n = len(ids)
    num_blocks = -(-n // block_size)
    cache = KVCache(model.config, num_blocks, block_size, model.dtype)
    meta = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size)
    kv = [cache.layer(i) for i in range(model.config.num_hidden_layers)]
    hidden: torch.Tensor = model(torch.tensor(ids), torch.arange(n), kv, meta)
    return hidden


@torch.inference_mode()
def forward_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one sequence."""
    return model.compute_logits(forward_hidden(model, ids))


def split_ids(calib_ids: list[list[int]], seq_len: int) -> list[list[int]]:
    """Cut calibration sequences into pieces of at most seq_len tokens (empty ones dropped)."""
    return [s[i : i + seq_len] for s in calib_ids for i in range(0, len(s), seq_len) if s[i:]]


def calib_ids_from_text(
    tokenizer: TextEncoder, text: str, num_tokens: int, seq_len: int
) -> list[list[int]]:
    """The first num_tokens tokens of text, in sequences of seq_len."""
    ids = tokenizer.encode(text)[:num_tokens]
    if not ids:
        raise ValueError("the calibration text is empty")
    return split_ids([ids], seq_len)


def collect_stats(
    model: LlamaForCausalLM,
    calib_ids: list[list[int]],
    max_rows: int = 0,
    seq_len: int = 512,
    progress: bool = True,
) -> dict[str, ActStats]:
    """Input statistics of every decoder-layer Linear, keyed by module path.

    max_rows > 0 also keeps about that many whole input rows per linear, evenly strided over
    all calibration tokens.
    """
    seqs = split_ids(calib_ids, min(seq_len, model.config.max_position_embeddings))
    if not seqs:
        raise ValueError("calibration needs at least one token")
    total = sum(len(s) for s in seqs)
    stride = max(1, math.ceil(total / max_rows)) if max_rows > 0 else 0
    stats: dict[str, ActStats] = {}
    offset = [0]  # token index of the current sequence's first token

    def make_hook(name: str, k: int) -> Callable[[Linear, tuple[torch.Tensor, ...]], None]:
        st = ActStats(torch.zeros(k), torch.zeros(k, dtype=torch.float64))
        stats[name] = st

        def hook(_mod: Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, k).float()
            a = x.abs()
            torch.maximum(st.absmax, a.amax(0), out=st.absmax)
            st.abssum += a.sum(0, dtype=torch.float64)
            st.count += x.shape[0]
            if stride:
                first = (-offset[0]) % stride  # rows whose global index is a multiple of stride
                st.rows.append(x[first::stride].clone())

        return hook

    handles = [
        mod.register_forward_pre_hook(make_hook(name, mod.in_features))
        for name, mod in model.named_modules()
        if isinstance(mod, Linear) and name.startswith("layers.")
    ]
    try:
        for ids in tqdm(seqs, desc="calibrating", unit="seq", disable=not progress):
            forward_hidden(model, ids)  # logits are not needed
            offset[0] += len(ids)
    finally:
        for h in handles:
            h.remove()
    return stats
