"""Reference attention over the paged KV cache in plain PyTorch.

Writes each new token's K/V into its slot, then:
- decode tokens (one query each) of all sequences are batched: their K/V are gathered through
  the block tables into a padded [B, max_ctx] view and masked;
- a prefill (or prefill chunk) with no earlier context uses SDPA with a causal mask on the fresh
  K/V directly; a chunk that continues cached context gathers that context and uses a causal
  mask offset by the number of cached tokens; a sequence with a tree mask takes that path with
  the tree mask among its new tokens instead of the causal one;
- under a retention policy, each sequence is attended on its own by the function registered
  for the policy's attention kind (StreamingLLM's sinks + window, H2O's kept slots).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from lamina.attention.base import AttentionBackend
from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import LayerCache
from lamina.kv.h2o import H2OAttention
from lamina.kv.retention import RetentionAttention
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding, apply_rotary


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D]: each KV head serves `groups` query heads."""
    if groups == 1:
        return x
    return repeat(x, "b h l d -> b (h g) l d", g=groups)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMetadata,
    i: int,
    scale: float,
    groups: int,
    out: torch.Tensor,
) -> None:
    """Sequence i's chunk of several new tokens: over its fresh K/V when nothing is cached
    before it, else over its gathered context with an offset causal (or tree) mask."""
    start, qlen, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
    qi = rearrange(q[start : start + qlen], "t h d -> 1 h t d")
    if ctx == qlen:  # nothing cached before this chunk: attend over the fresh K/V
        ki, vi = k[start : start + qlen], v[start : start + qlen]
        mask = None
    else:
        nblocks = -(-ctx // meta.block_size)
        ki, vi = cache.gather(meta.block_tables[i, :nblocks])
        ki, vi = ki[:ctx], vi[:ctx]
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)
        mask = (torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None])[None, None]
    tree = meta.tree_masks[i] if meta.tree_masks is not None else None
    if tree is not None:
        mask = _tree_mask(tree, ctx, qlen, q.device)
    ki = expand_kv_heads(rearrange(ki, "t h d -> 1 h t d"), groups)
    vi = expand_kv_heads(rearrange(vi, "t h d -> 1 h t d"), groups)
    oi = F.scaled_dot_product_attention(
        qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=scale
    )
    out[start : start + qlen] = rearrange(oi, "1 h t d -> t h d")


def _tree_mask(tree: torch.Tensor, ctx: int, qlen: int, device: torch.device) -> torch.Tensor:
    """[1, 1, qlen, ctx]: every cached token visible, the tree mask among the new ones."""
    mask = torch.ones(qlen, ctx, dtype=torch.bool, device=device)
    mask[:, ctx - qlen :] = tree.to(device=device, dtype=torch.bool)
    return mask[None, None]


def _decode(
    q: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMetadata,
    scale: float,
    groups: int,
    out: torch.Tensor,
) -> None:
    """Single-token query rows (decode tokens, and each token of a short chunk over cached
    context, whose context ends at itself), a bucket of similar context lengths at a time
    (metadata.py), over their gathered, padded and masked contexts.

    Whole blocks are gathered with one index_select (block-sized contiguous rows). The query
    heads that share a KV head are laid out as that head's "query positions", so no KV head is
    ever repeated: each decode query sees every key of its sequence, so no causal mask is needed
    among the query heads of one KV head.
    """
    assert meta.decode_buckets is not None
    for bucket in meta.decode_buckets:
        qd = q if bucket.all_rows else q[bucket.rows]
        batch, nblocks = bucket.block_tables.shape
        kd, vd = cache.gather(bucket.block_tables.reshape(-1))
        length = nblocks * cache.block_size
        kd = kd.view(batch, length, *kd.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
        vd = vd.view(batch, length, *vd.shape[1:]).transpose(1, 2)
        # "b (h g) d -> b h g d" and back, as plain views: einops' per-call overhead is
        # measurable at 30 layers per decode step
        qg = qd.view(batch, -1, groups, qd.shape[-1])
        od = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=bucket.mask, scale=scale)
        od = od.reshape(batch, -1, od.shape[-1])
        if bucket.all_rows:
            out.copy_(od)
        else:
            out[bucket.rows] = od


def _streaming(
    q: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMetadata,
    win: StreamingWindow,
    i: int,
    scale: float,
    groups: int,
    out: torch.Tensor,
    rotary: RotaryEmbedding | None,
) -> None:
    """One sequence under StreamingLLM: gather its live blocks, rotate the un-rotated keys at
    their cache positions, and mask to sinks + window by logical position."""
    assert rotary is not None, "StreamingLLM rotates keys on read"
    start, qlen, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
    nblocks = -(-ctx // meta.block_size)
    ki, vi = cache.gather(meta.block_tables[i, :nblocks])
    ki, vi = ki[:ctx], vi[:ctx]
    cache_pos = torch.arange(ctx, device=q.device)
    ki = rotate_at_ranks(ki, meta, i, rotary)
    offset = win.offsets[i]
    key_pos = torch.where(cache_pos < win.sink_limit, cache_pos, cache_pos + offset)
    q_pos = torch.arange(ctx - qlen, ctx, device=q.device) + offset
    visible = (key_pos[None, :] <= q_pos[:, None]) & (
        (key_pos[None, :] < win.sinks) | (key_pos[None, :] > q_pos[:, None] - win.window)
    )
    qi = rearrange(q[start : start + qlen], "t h d -> 1 h t d")
    ki = expand_kv_heads(rearrange(ki, "t h d -> 1 h t d"), groups)
    vi = expand_kv_heads(rearrange(vi, "t h d -> 1 h t d"), groups)
    oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=visible[None, None], scale=scale)
    out[start : start + qlen] = rearrange(oi, "1 h t d -> t h d")


def rotate_at_ranks(
    k: torch.Tensor, meta: AttentionMetadata, i: int, rotary: RotaryEmbedding, start: int = 0
) -> torch.Tensor:
    """Un-rotated keys [L, Hkv, D] of sequence i rotated at positions start .. start + L - 1
    (their index in the compacted cache), with the sequence's dynamic-NTK length if any."""
    ranks = torch.arange(start, start + k.shape[0], device=k.device)
    lens = None if meta.rope_seq_lens is None else torch.full_like(ranks, meta.rope_seq_lens[i])
    cos, sin = rotary.cos_sin(ranks, k.dtype, lens)
    return apply_rotary(k, cos, sin, rotary.rotary_dim)


def _h2o(
    q: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMetadata,
    h2o: H2OAttention,
    i: int,
    scale: float,
    groups: int,
    out: torch.Tensor,
    rotary: RotaryEmbedding | None,
) -> None:
    """Attention over one sequence's kept tokens, written out so the probabilities can be
    accumulated into each kept token's heavy-hitter score. With cache positions the
    un-rotated keys are rotated at their rank among the kept tokens."""
    start, qlen = meta.query_starts[i], meta.query_lens[i]
    ki, vi = cache.gather_slots(h2o.slots[i])
    if h2o.cache_positions:
        assert rotary is not None, "H2O with cache positions rotates keys on read"
        ki = rotate_at_ranks(ki, meta, i, rotary)
    key_pos = h2o.positions[i]
    q_pos = key_pos[-qlen:]
    qi = rearrange(q[start : start + qlen], "t (h g) d -> h g t d", g=groups)
    scores = torch.einsum("hgtd,lhd->hgtl", qi.float(), ki.float()) * scale
    causal = key_pos[None, :] <= q_pos[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    h2o.scores[i].add_(probs.sum(dim=(0, 1, 2)))
    oi = torch.einsum("hgtl,lhd->thgd", probs, vi.float()).to(q.dtype)
    out[start : start + qlen] = rearrange(oi, "t h g d -> t (h g) d")


_RETENTION_ATTENTION: dict[type[RetentionAttention], Callable[..., None]] = {
    StreamingWindow: _streaming,
    H2OAttention: _h2o,
}


class TorchAttentionBackend(AttentionBackend):
    """The plain-PyTorch reference: gathers K/V through the block tables, then SDPA."""

    name = "torch"
    supported_retention = tuple(_RETENTION_ATTENTION)
    priority = 0

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
        """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens -> output [T, Hq, D]."""
        cache.write(k, v, meta.slot_mapping)
        groups = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        if meta.retention is not None:
            per_sequence = _RETENTION_ATTENTION[type(meta.retention)]
            for i in range(meta.num_seqs):
                per_sequence(q, cache, meta, meta.retention, i, scale, groups, out, rotary)
            return out
        if meta.tree_masks is not None and meta.batched_ids is not None:
            tree = {i for i, m in enumerate(meta.tree_masks) if m is not None}
            if tree & {i for i in meta.batched_ids if meta.query_lens[i] > 1}:
                # a tree mask is not causal: those sequences go one by one (once per step)
                meta.batch_rows([i for i in meta.batched_ids if i not in tree], q.device)
        if meta.decode_buckets:
            _decode(q, cache, meta, scale, groups, out)
        for i in meta.chunk_ids if meta.chunk_ids is not None else meta.prefill_ids:
            _prefill(q, k, v, cache, meta, i, scale, groups, out)
        return out
