"""Paged attention for the CPU in C++ (backend "cpu-paged").

The torch backend gathers every decode sequence's K/V through its block table into a padded
copy (and a continuing prefill chunk its whole cached context) before calling SDPA; at long
contexts that copy dominates. This backend runs lamina/csrc/paged_attention.cpp instead: the
FlashAttention recurrence (see attention/online_softmax.py, the oracle it is tested against)
over key tiles read in place through the block table, parallel over sequences x KV heads x
blocks of new tokens, and for a few long decodes over key splits too (flash-decoding: the
splits' partial softmaxes are merged by their log-sum-exp weights), vectorised with ATen's
at::vec. bf16 / fp32 / int8 caches, GQA, causal and tree masks.

StreamingLLM runs in the kernel too: keys cached un-rotated are rotated as each tile is loaded,
at their cache index (cos / sin tables built once per step), and masked to sinks + window by
logical position. H2O (token-level kept slots) is not implemented: refused at start. Split
boundaries depend on the batch, so results are equal to the reference within float32
rounding, not bit-stable across batches (that is the "exact" backend). Needs the kernel built
(a C++ compiler; see attention/extension.py); without it the backend reports itself
unavailable with the reason and "auto" keeps the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.attention.base import KernelAttentionBackend
from lamina.attention.extension import load_kernel
from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import LayerCache
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding

KERNEL = "paged_attention"


@dataclass
class PagedMetadata(AttentionMetadata):
    """The step's metadata plus its per-sequence facts as int64 tensors for the kernel."""

    starts_t: torch.Tensor | None = None  # [S] first row of each sequence's new tokens
    qlens_t: torch.Tensor | None = None  # [S]
    ctxs_t: torch.Tensor | None = None  # [S]
    # StreamingLLM's kernel arguments, built by the first layer that needs them (a step's
    # metadata is shared by every layer): window [3 + S], cos, sin [tables, L, rd], table_of [S]
    window_args: tuple[torch.Tensor, ...] | None = None


def _window_arguments(
    meta: PagedMetadata, win: StreamingWindow, rotary: RotaryEmbedding
) -> tuple[torch.Tensor, ...]:
    """The window's sizes and offsets, and the cos / sin rows of cache indices 0 .. L-1 at
    which the kernel rotates the un-rotated keys (one table per sequence under dynamic NTK)."""
    length = max(meta.context_lens)
    ranks = torch.arange(length)
    window = torch.tensor([win.sinks, win.window, win.sink_limit, *win.offsets], dtype=torch.int64)
    if meta.rope_seq_lens is None:
        cos, sin = rotary.cos_sin(ranks, torch.float32)
        cos, sin = cos.reshape(1, length, -1), sin.reshape(1, length, -1)
        table_of = torch.zeros(meta.num_seqs, dtype=torch.int64)
    else:
        pairs = [
            rotary.cos_sin(ranks, torch.float32, torch.full_like(ranks, n))
            for n in meta.rope_seq_lens
        ]
        cos = torch.stack([c.reshape(length, -1) for c, _ in pairs])
        sin = torch.stack([s.reshape(length, -1) for _, s in pairs])
        table_of = torch.arange(meta.num_seqs, dtype=torch.int64)
    return window, cos.float().contiguous(), sin.float().contiguous(), table_of


def _tree_arguments(
    meta: AttentionMetadata,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The tree masks as one flat bool tensor and each sequence's offset in it (-1: causal)."""
    if meta.tree_masks is None or all(m is None for m in meta.tree_masks):
        return None, None
    flat, offsets, at = [], [], 0
    for mask in meta.tree_masks:
        if mask is None:
            offsets.append(-1)
            continue
        offsets.append(at)
        flat.append(mask.to(torch.bool).reshape(-1))
        at += mask.numel()
    return torch.cat(flat).contiguous(), torch.tensor(offsets, dtype=torch.int64)


class CpuPagedAttentionBackend(KernelAttentionBackend):
    """The C++ paged kernel (module docstring). `split_keys`: keys per split-K piece (> 0),
    0 to let the kernel decide from the thread count, < 0 never to split."""

    name = "cpu-paged"
    supported_retention = (StreamingWindow,)
    # Priority stays below torch's until benchmarks/results/attention.md shows the kernel
    # faster at every measured shape (see that file): it is chosen by name meanwhile.
    priority = -1
    kernel = KERNEL

    def __init__(self, split_keys: int = 0) -> None:
        self.split_keys = split_keys

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        slot_mapping: torch.Tensor | None = None,
    ) -> PagedMetadata:
        base = AttentionMetadata.build(
            query_lens, context_lens, block_tables, block_size, device, slot_mapping
        )
        return PagedMetadata(
            **vars(base),
            starts_t=torch.tensor(base.query_starts, dtype=torch.int64),
            qlens_t=torch.tensor(query_lens, dtype=torch.int64),
            ctxs_t=torch.tensor(context_lens, dtype=torch.int64),
        )

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
        assert isinstance(meta, PagedMetadata), "metadata from CpuPagedAttentionBackend"
        window: tuple[torch.Tensor | None, ...] = (None, None, None, None)
        if meta.retention is not None:
            if not isinstance(meta.retention, StreamingWindow):
                raise ValueError(f"cpu-paged does not run {type(meta.retention).__name__}")
            assert rotary is not None, "StreamingLLM rotates keys on read"
            if meta.window_args is None:
                meta.window_args = _window_arguments(meta, meta.retention, rotary)
            window = meta.window_args
        cache.write(k, v, meta.slot_mapping)
        kernel = load_kernel(KERNEL)
        assert kernel is not None, "checked by available() when the engine started"
        tree, offsets = _tree_arguments(meta)
        out: torch.Tensor = kernel.paged_attention(
            q.contiguous(),
            cache.k,
            cache.v,
            cache.k_scale,
            cache.v_scale,
            meta.block_tables,
            meta.starts_t,
            meta.qlens_t,
            meta.ctxs_t,
            tree,
            offsets,
            scale,
            self.split_keys,
            *window,
        )
        return out
