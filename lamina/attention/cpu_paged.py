"""Paged attention for the CPU in C++ (backend "cpu-paged").

The torch backend gathers every decode sequence's K/V through its block table into a padded
copy (and a continuing prefill chunk its whole cached context) before calling SDPA; at long
contexts that copy dominates. This backend runs lamina/csrc/paged_attention.cpp instead: the
FlashAttention recurrence (see attention/online_softmax.py, the oracle it is tested against)
over key tiles read in place through the block table, parallel over sequences x KV heads x
blocks of new tokens, and for a few long decodes over key splits too (flash-decoding: the
splits' partial softmaxes are merged by their log-sum-exp weights), vectorised with ATen's
at::vec. bf16 / fp32 / int8 caches, GQA, causal and tree masks.

StreamingLLM (sinks + window, keys rotated on read at their cache rank) and H2O are not
implemented in C++: `supported_retention` is empty, so a policy that needs them is refused at
start (use the torch backend). Split boundaries depend on the batch, so results are equal to
the reference within float32 rounding, not bit-stable across batches (that is the "exact"
backend). Needs the kernel built (a C++ compiler; see attention/extension.py); without it the
backend reports itself unavailable with the reason and "auto" keeps the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.attention.base import AttentionBackend
from lamina.attention.extension import kernel_failure, load_kernel
from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import LayerCache
from lamina.layers.rotary import RotaryEmbedding

KERNEL = "paged_attention"


@dataclass
class PagedMetadata(AttentionMetadata):
    """The step's metadata plus its per-sequence facts as int64 tensors for the kernel."""

    starts_t: torch.Tensor | None = None  # [S] first row of each sequence's new tokens
    qlens_t: torch.Tensor | None = None  # [S]
    ctxs_t: torch.Tensor | None = None  # [S]


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


class CpuPagedAttentionBackend(AttentionBackend):
    """The C++ paged kernel (module docstring). `split_keys`: keys per split-K piece (> 0),
    0 to let the kernel decide from the thread count, < 0 never to split."""

    name = "cpu-paged"
    supported_retention = ()
    # Priority stays below torch's until benchmarks/results/attention.md shows the kernel
    # faster at every measured shape (see that file): it is chosen by name meanwhile.
    priority = -1

    def __init__(self, split_keys: int = 0) -> None:
        self.split_keys = split_keys

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return cls.unavailable_reason(device) is None

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "its kernel is for the CPU"
        if load_kernel(KERNEL) is None:
            return kernel_failure(KERNEL) or "its C++ kernel is not built"
        return None

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
        if meta.retention is not None:
            raise ValueError("the cpu-paged attention backend runs no retention policy")
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
        )
        return out
