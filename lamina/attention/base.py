"""The attention-backend seam: how one layer attends over the paged KV cache.

The model calls one `AttentionBackend` object, chosen when the engine starts (by name, device
and retention policy) through the registry in `attention/registry.py`. A backend

- builds the step's `AttentionMetadata` once per forward pass (`build_metadata`), where it may
  precompute whatever its kernels want (the torch backend buckets decode sequences by context
  length);
- writes the new tokens' K/V to their slots and attends (`forward`): decode tokens, prefill
  chunks with or without cached context, and sequences whose new tokens carry a tree mask
  (`meta.tree_masks`, for verifying several proposed tokens at once);
- declares which retention attention kinds it implements (`supported_retention`), so a policy
  the backend cannot run is refused at start with a clear error, not mid-request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from lamina.attention.extension import kernel_failure, load_kernel
from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import LayerCache
from lamina.kv.retention import RetentionAttention
from lamina.layers.rotary import RotaryEmbedding


class AttentionBackend(ABC):
    name: ClassVar[str]
    # Retention attention kinds (StreamingWindow, H2OAttention, ...) this backend runs.
    supported_retention: ClassVar[tuple[type[RetentionAttention], ...]] = ()
    # "auto" picks the available backend with the highest priority for the device.
    priority: ClassVar[int] = 0

    @classmethod
    def available(cls, device: torch.device) -> bool:
        """Whether the backend can run on `device` here (kernels built, hardware present)."""
        return True

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why `available(device)` is False, for the error that refuses the backend."""
        return None

    @classmethod
    def supports(cls, retention: type[RetentionAttention] | None) -> bool:
        return retention is None or issubclass(retention, cls.supported_retention)

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        slot_mapping: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """One step's metadata, shared by every layer (see AttentionMetadata.build)."""
        return AttentionMetadata.build(
            query_lens, context_lens, block_tables, block_size, device, slot_mapping
        )

    @abstractmethod
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
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq, D].
        Writes k/v to `meta.slot_mapping` first. `rotary` rotates keys cached un-rotated
        (`meta.keys_rotated_on_read`)."""


class KernelAttentionBackend(AttentionBackend):
    """A backend over one of lamina's C++ CPU kernels (`kernel`, a lamina/csrc file stem):
    available once it is built, else refused with the build's reason (attention/extension.py)."""

    kernel: ClassVar[str]

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return cls.unavailable_reason(device) is None

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "its kernel is for the CPU"
        if load_kernel(cls.kernel) is None:
            return kernel_failure(cls.kernel) or "its C++ kernel is not built"
        return None
