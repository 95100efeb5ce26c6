"""Attention test cases over a real paged cache and the float64 truth they are held to, shared
by the backend tests (test_attention_reference.py, test_attention_exact.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lamina.attention.metadata import AttentionMetadata
from lamina.config import ModelConfig
from lamina.kv.cache import KVCache
from lamina.layers.rotary import apply_rotary

MetadataBuilder = Callable[[list[int], list[int], list[list[int]], int], AttentionMetadata]


def build_case(
    heads,
    kv_heads,
    dim,
    bs,
    shapes,
    kv_dtype="auto",
    seed=0,
    dtype=torch.float32,
    metadata: MetadataBuilder = AttentionMetadata.build,
):
    """A cache holding each sequence's earlier context in scattered blocks, plus the new
    tokens' q / k / v and the step's metadata (from `metadata`, a backend's build_metadata).
    shapes: (context_len, query_len) per sequence."""
    torch.manual_seed(seed)
    cfg = ModelConfig("llama", 10, heads * dim, 64, 1, heads, kv_heads, dim, 8192, 1e-6)
    num_blocks = sum(-(-ctx // bs) for ctx, _ in shapes) + 3
    cache = KVCache(cfg, num_blocks, bs, dtype, kv_cache_dtype=kv_dtype)
    layer = cache.layer(0)
    free = torch.randperm(num_blocks).tolist()
    tables, new_k, new_v = [], [], []
    for ctx, qlen in shapes:
        table, free = free[: -(-ctx // bs)], free[-(-ctx // bs) :]
        tables.append(table)
        k = torch.randn(ctx, kv_heads, dim).to(dtype)
        v = torch.randn(ctx, kv_heads, dim).to(dtype)
        if ctx > qlen:
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx - qlen)])
            layer.write(k[: ctx - qlen], v[: ctx - qlen], slots)
        new_k.append(k[ctx - qlen :])
        new_v.append(v[ctx - qlen :])
    meta = metadata([q for _, q in shapes], [c for c, _ in shapes], tables, bs)
    q = torch.randn(sum(q for _, q in shapes), heads, dim).to(dtype)
    return cfg, layer, meta, q, torch.cat(new_k), torch.cat(new_v)


def truth(q, layer, meta, scale, rotary=None):
    """Dense softmax attention per sequence in float64 over the K/V the cache now holds."""
    out = torch.empty(q.shape, dtype=torch.float64)
    groups = q.shape[1] // layer.k.shape[2]
    for i in range(meta.num_seqs):
        start, qlen, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
        nblocks = -(-ctx // meta.block_size)
        k, v = layer.gather(meta.block_tables[i, :nblocks])
        k, v = k[:ctx].double(), v[:ctx].double()
        keys, queries = torch.arange(ctx), torch.arange(ctx - qlen, ctx)
        visible = keys[None, :] <= queries[:, None]
        if meta.tree_masks is not None and meta.tree_masks[i] is not None:
            visible = torch.ones(qlen, ctx, dtype=torch.bool)
            visible[:, ctx - qlen :] = meta.tree_masks[i]
        win = meta.retention
        if win is not None:
            cos, sin = rotary.cos_sin(keys, torch.float64)
            k = apply_rotary(k, cos, sin, rotary.rotary_dim)
            kp = torch.where(keys < win.sink_limit, keys, keys + win.offsets[i])
            qp = queries + win.offsets[i]
            visible = (kp[None, :] <= qp[:, None]) & (
                (kp[None, :] < win.sinks) | (kp[None, :] > qp[:, None] - win.window)
            )
        for h in range(q.shape[1]):
            scores = (q[start : start + qlen, h].double() @ k[:, h // groups].T) * scale
            weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out[start : start + qlen, h] = weights @ v[:, h // groups]
    return out


def run(backend, case, scale=0.125, rotary=None):
    _, layer, meta, q, k, v = case
    return backend.forward(q, k, v, layer, meta, scale, rotary).double()
