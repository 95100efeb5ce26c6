"""Linear layers. Parameters start uninitialised: every value is overwritten by the checkpoint,
so random initialisation would only cost load time.

On CPU, `F.linear` hands oneDNN a plain row-major weight on every call, which it re-reads in
an unfavourable layout: at decode batch sizes (a handful of rows) that costs 1.4-1.6x in
bfloat16 and 2-4x in float32 against the same GEMM on a weight reordered once into oneDNN's
blocked layout (measured in PEERS.md). `pack_weight` does that reorder (the op inductor's
freezing pass uses, pinned with torch) and the engine packs every plain `Linear` once it owns
the model, dropping the row-major copy. On the Zen 4 CPUs measured, a packed GEMM's result for a
row does not depend on how many rows share the call once there are two or more; a single row
takes oneDNN's matrix-vector kernel, whose sums differ in the last bits (plain `F.linear` does
the same). So batch-invariant mode (`min_rows=2`) computes a lone row as the first of two.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this torch build can run `weight` as a oneDNN-packed CPU GEMM."""
    # torch.backends.mkldnn.is_available is unannotated in torch (it returns a bool)
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if weight.device.type != "cpu" or not mkldnn:
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> an opaque oneDNN tensor for `packed_linear` (`.to_dense()` undoes)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    return cast(torch.Tensor, packed)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 1
) -> torch.Tensor:
    """y = x W^T (+ b) for a 2-D x and a weight from `pack_weight`, computed over at least
    `min_rows` rows (zero rows pad a shorter x; see the module docstring)."""
    rows = x.shape[0]
    x = pad_rows(x.contiguous(), min_rows)
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return cast(torch.Tensor, y)[:rows]


def pad_rows(x: torch.Tensor, min_rows: int) -> torch.Tensor:
    """x [n, ...] with zero rows appended up to `min_rows` rows."""
    if x.shape[0] >= min_rows:
        return x
    return torch.cat([x, x.new_zeros(min_rows - x.shape[0], *x.shape[1:])])


class Linear(nn.Module):
    """y = x W^T (+ b). The seam where quantized and LoRA linears plug in later."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

        self.packed: torch.Tensor | None = None
        self.min_rows = 1  # 2 in batch-invariant mode (module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2:
            return packed_linear(x, self.packed, self.bias, self.min_rows)
        if self.packed is not None:
            shape = x.shape
            y = packed_linear(x.reshape(-1, shape[-1]), self.packed, self.bias, self.min_rows)
            return y.view(*shape[:-1], -1)
        if self.min_rows > 1 and x.dim() == 2:
            return F.linear(pad_rows(x, self.min_rows), self.weight, self.bias)[: x.shape[0]]
        return F.linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        """Keep the weight only in oneDNN's packed layout (see the module docstring); `weight`
        becomes empty until `unpack`. Returns False (and changes nothing) where unsupported."""
        if self.packed is not None or not can_pack(self.weight):
            return self.packed is not None
        self.packed = pack_weight(self.weight)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight, row-major, whether or not it is packed."""
        return self.weight if self.packed is None else self.packed.to_dense()

    def unpack(self) -> None:
        """Restore the row-major weight (for code that reads or rewrites `weight`)."""
        if self.packed is not None:
            self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
            self.packed = None

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed is not None else ""
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{packed}"
        )
