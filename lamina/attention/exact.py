"""Batch-invariant attention (backend "exact", what `batch_invariant=True` runs).

torch's attention kernels pick their blocking from the shapes of the call: a decode token is
reduced one way inside a padded batch of decode queries and another way inside a prefill chunk,
so after a preemption (whose recomputation prefills tokens that were decoded) or under another
chunking, the same token's attention differs in the last bits, and in bfloat16 that is enough
to change a greedy token within a few dozen steps. This backend runs a C++ kernel
(lamina/csrc/exact_attention.cpp) that reduces every (token, head) row on its own over keys
0 .. n-1 in fixed tiles from key 0, so a row's result depends only on its query and its keys:
whatever else shares the batch, whether its sequence decodes or prefills, wherever chunk
boundaries fall, and however many threads run. Keys are read in place through the block table
(no gathered copy); int8 caches are dequantized per key with their scales.

It runs dense causal attention only (no retention policy, no tree masks) and needs the kernel
built (a C++ compiler; see attention/extension.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.attention.base import KernelAttentionBackend
from lamina.attention.extension import load_kernel
from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import LayerCache
from lamina.layers.rotary import RotaryEmbedding

KERNEL = "exact_attention"


@dataclass
class ExactMetadata(AttentionMetadata):
    """The step's metadata plus, per new token, its sequence's row in `block_tables` and how
    many keys (from key 0) it sees."""

    token_seqs: torch.Tensor | None = None  # [T] int64
    token_keys: torch.Tensor | None = None  # [T] int64


class ExactAttentionBackend(KernelAttentionBackend):
    """Row-by-row attention whose result does not depend on the batch (module docstring)."""

    name = "exact"
    kernel = KERNEL
    supported_retention = ()
    priority = -1  # chosen by name, or by batch_invariant=True

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        slot_mapping: torch.Tensor | None = None,
    ) -> ExactMetadata:
        base = AttentionMetadata.build(
            query_lens, context_lens, block_tables, block_size, device, slot_mapping
        )
        lens = torch.tensor(query_lens, dtype=torch.int64)
        seqs = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
        # token j of a sequence's new tokens sees ctx - qlen + j + 1 keys
        firsts = torch.tensor(context_lens, dtype=torch.int64) - lens
        starts = torch.cumsum(lens, 0) - lens
        keys = firsts[seqs] + torch.arange(int(lens.sum())) - starts[seqs] + 1
        return ExactMetadata(**vars(base), token_seqs=seqs, token_keys=keys)

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
        assert isinstance(meta, ExactMetadata), "metadata from ExactAttentionBackend"
        if meta.tree_masks is not None and any(m is not None for m in meta.tree_masks):
            raise ValueError("the exact attention backend does not run tree masks")
        cache.write(k, v, meta.slot_mapping)
        kernel = load_kernel(KERNEL)
        assert kernel is not None, "checked by available() when the engine started"
        out: torch.Tensor = kernel.exact_paged_attention(
            q.contiguous(),
            cache.k,
            cache.v,
            cache.k_scale,
            cache.v_scale,
            meta.block_tables,
            meta.token_seqs,
            meta.token_keys,
            scale,
        )
        return out
