"""What every quantized linear shares: the checkpoint interface and its shape checks."""

from __future__ import annotations

from typing import Protocol

import torch


class QuantLinear(Protocol):
    """A drop-in for `lamina.layers.linear.Linear` that saves and loads its own tensors.

    `state_tensors` returns the portable on-disk form (it may differ from the in-memory
    kernel layout, e.g. int4); `load_state_tensors` takes that form back. Both round-trip
    bit-exactly.
    """

    method: str
    in_features: int
    out_features: int

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def check_shape(name: str, got: torch.Tensor, want: tuple[int, ...] | torch.Size) -> None:
    """Raise a ValueError naming the tensor when a checkpoint's shape is not the config's."""
    if tuple(got.shape) != tuple(want):
        raise ValueError(
            f"quantized tensor {name} has shape {tuple(got.shape)}, expected {tuple(want)}; "
            "the checkpoint does not match its config"
        )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous and 64-byte aligned, else an aligned contiguous copy.

    torch 2.13's `_weight_int8pack_mm` segfaults for M >= 4 rows when the weight's data pointer
    is not 64-byte aligned, and tensors memory-mapped from safetensors sit at arbitrary offsets;
    torch's own CPU allocations are 64-byte aligned.
    """
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)
