"""Attention over the paged KV cache one block at a time with an online softmax: the recurrence
of FlashAttention (Dao et al., 2022; 2023) and the split-K merge of flash-decoding, written to
be read next to those papers. It is the oracle the fused kernels are tested against, not a fast
path (backend "reference"; "auto" never picks it).

For each sequence the keys are visited in tiles of one cache block, read in place through the
block table (no padded copy of the context). Per query row it keeps the running maximum m of
the scores seen so far, the running sum l of exp(score - m), and the running output
acc = sum exp(score - m) * v. A new tile with scores s updates them:

    m' = max(m, max(s));  l' = l * exp(m - m') + sum exp(s - m');
    acc' = acc * exp(m - m') + exp(s - m') @ v

and the output is acc / l. For long contexts the blocks are cut into splits of
`blocks_per_split` blocks that each run the recurrence alone (on a GPU, in parallel); the
partial results are merged with their log-sum-exp weights:

    M = max_s m_s;  out = sum_s acc_s * exp(m_s - M) / sum_s l_s * exp(m_s - M)

Masks are decided per key by position: causal (a key at or before the query), a tree mask
among the new tokens (`meta.tree_masks`), or StreamingLLM's sinks + window with keys rotated at
their cache position when read. GQA is handled by laying the query heads that share a KV head
side by side, so no KV head is ever repeated. int8 caches are dequantized per tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from lamina.attention.base import AttentionBackend
from lamina.attention.metadata import AttentionMetadata
from lamina.attention.torch_backend import rotate_at_ranks
from lamina.kv.cache import LayerCache
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding


@dataclass
class OnlineSoftmaxState:
    """Running softmax of one split: m and l [Hkv, g, qlen], acc [Hkv, g, qlen, D], float32."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the papers' name
    acc: torch.Tensor

    @staticmethod
    def empty(heads: int, groups: int, qlen: int, dim: int) -> OnlineSoftmaxState:
        return OnlineSoftmaxState(
            torch.full((heads, groups, qlen), float("-inf")),
            torch.zeros(heads, groups, qlen),
            torch.zeros(heads, groups, qlen, dim),
        )

    def update(self, scores: torch.Tensor, v: torch.Tensor) -> None:
        """Fold in one tile: scores [Hkv, g, qlen, n] (-inf where masked), v [n, Hkv, D]."""
        m_new = torch.maximum(self.m, scores.amax(dim=-1))
        # rows that have seen no visible key yet keep m = -inf: subtract 0 there, not -inf
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - shift.unsqueeze(-1))
        correction = torch.exp(self.m - shift)
        self.l = self.l * correction + p.sum(dim=-1)
        self.acc = self.acc * correction.unsqueeze(-1) + torch.einsum("hgtn,nhd->hgtd", p, v)
        self.m = m_new


def merge_splits(parts: list[OnlineSoftmaxState]) -> torch.Tensor:
    """Combine splits by their log-sum-exp weights -> output [Hkv, g, qlen, D]."""
    top = torch.stack([p.m for p in parts]).amax(dim=0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total_l = torch.zeros_like(parts[0].l)
    total_acc = torch.zeros_like(parts[0].acc)
    for p in parts:
        weight = torch.exp(p.m - top)
        total_l = total_l + p.l * weight
        total_acc = total_acc + p.acc * weight.unsqueeze(-1)
    return total_acc / total_l.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)


def visible_keys(
    meta: AttentionMetadata, i: int, keys: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """[qlen, n] bool: which live cache indices `keys` the new tokens (cache indices
    `queries`) of sequence i may attend."""
    ctx, qlen = meta.context_lens[i], meta.query_lens[i]
    if meta.retention is not None:  # the only kind this backend supports
        win = cast(StreamingWindow, meta.retention)
        offset = win.offsets[i]
        key_pos = torch.where(keys < win.sink_limit, keys, keys + offset)
        q_pos = queries + offset
        return (key_pos[None, :] <= q_pos[:, None]) & (
            (key_pos[None, :] < win.sinks) | (key_pos[None, :] > q_pos[:, None] - win.window)
        )
    visible = keys[None, :] <= queries[:, None]
    tree = meta.tree_masks[i] if meta.tree_masks is not None else None
    if tree is not None:
        new = keys >= ctx - qlen
        cols = (keys - (ctx - qlen)).clamp(min=0)
        visible = torch.where(new[None, :], tree.to(torch.bool)[:, cols], True)
    return visible


def attend_sequence(
    q: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMetadata,
    i: int,
    scale: float,
    rotary: RotaryEmbedding | None,
    blocks_per_split: int,
) -> torch.Tensor:
    """Sequence i's new queries q [qlen, Hq, D] over its cached context -> [qlen, Hq, D]."""
    ctx, qlen = meta.context_lens[i], meta.query_lens[i]
    heads, dim = cache.k.shape[2], q.shape[-1]
    groups = q.shape[1] // heads
    qg = q.float().view(qlen, heads, groups, dim).permute(1, 2, 0, 3) * scale  # [Hkv,g,qlen,D]
    queries = torch.arange(ctx - qlen, ctx)
    bs = meta.block_size
    nblocks = -(-ctx // bs)
    table = meta.block_tables[i, :nblocks]
    parts = []
    for first in range(0, nblocks, blocks_per_split):
        state = OnlineSoftmaxState.empty(heads, groups, qlen, dim)
        for b in range(first, min(first + blocks_per_split, nblocks)):
            n = min(bs, ctx - b * bs)  # the last block may be partly filled
            k, v = cache.gather(table[b : b + 1])
            k, v = k[:n], v[:n].float()
            keys = torch.arange(b * bs, b * bs + n)
            if meta.keys_rotated_on_read:
                assert rotary is not None, "keys cached un-rotated need the rotary embedding"
                k = rotate_at_ranks(k, meta, i, rotary, start=b * bs)
            scores = torch.einsum("hgtd,nhd->hgtn", qg, k.float())
            mask = visible_keys(meta, i, keys, queries)
            state.update(scores.masked_fill(~mask, float("-inf")), v)
        parts.append(state)
    out = merge_splits(parts)  # [Hkv, g, qlen, D]
    return out.permute(2, 0, 1, 3).reshape(qlen, heads * groups, dim).to(q.dtype)


class OnlineSoftmaxBackend(AttentionBackend):
    """The block-by-block online-softmax reference (see the module docstring)."""

    name = "reference"
    supported_retention = (StreamingWindow,)
    priority = -1  # correct but slow: chosen by name only

    def __init__(self, blocks_per_split: int = 8) -> None:
        self.blocks_per_split = blocks_per_split

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        meta: AttentionMetadata,
        scale: float,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        cache.write(k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            start, qlen = meta.query_starts[i], meta.query_lens[i]
            out[start : start + qlen] = attend_sequence(
                q[start : start + qlen], cache, meta, i, scale, rotary, self.blocks_per_split
            )
        return out
