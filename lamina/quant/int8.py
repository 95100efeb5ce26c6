"""Weight-only int8 linear: per-output-channel symmetric scales, int8 weights kept as int8.

The matmul runs through `torch._weight_int8pack_mm(x, w_int8[N, K], scales[N])`, which
dequantizes inside the kernel, so no float copy of the weight is ever kept. In torch 2.13 on
CPU that kernel is vectorised only for bfloat16 activations (float32 activations take a scalar
path ~20x slower than float F.linear, float16 too), and it requires `scales` in the
activation's dtype. So activations are cast to bfloat16 for the call and back afterwards, and
the scales are stored in bfloat16; the weights are rounded against the bfloat16 scales, so
what is stored is exactly what is multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamina.quant.base import aligned, check_shape

COMPUTE_DTYPE = torch.bfloat16
HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")


def quantize_per_channel(
    w: torch.Tensor, scale_dtype: torch.dtype = COMPUTE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K] in [-127, 127], scales [N]).

    The scale is rounded to `scale_dtype` first and q is computed against the rounded scale,
    so dequantization q * scale uses exactly the stored numbers (no systematic scale error).
    """
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 tensor stands for (reference and tests only)."""
    return q.float() * scales.float()[:, None]


class Int8WeightLinear(nn.Module):
    """Storage shared by the int8-weight linears: int8 q [N, K], per-row scales [N] in
    `scale_dtype`, optional float bias; subclasses say how the matmul runs."""

    scale_dtype: torch.dtype = torch.float32
    qweight: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=self.scale_dtype))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8WeightLinear:
        n, k = weight.shape
        dtype = bias.dtype if bias is not None else weight.dtype
        mod = cls(k, n, bias is not None, dtype)
        mod.qweight, mod.scales = quantize_per_channel(weight, cls.scale_dtype)
        if bias is not None and mod.bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    # ---- checkpoint --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (already portable: plain row-major int8 and scales)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias.data
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_shape("qweight", tensors["qweight"], self.qweight.shape)
        check_shape("scales", tensors["scales"], self.scales.shape)
        self.qweight = aligned(tensors["qweight"].to(torch.int8))
        self.scales = aligned(tensors["scales"].to(self.scale_dtype))
        if self.bias is not None:
            self.bias.data = tensors["bias"].to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int8Linear(Int8WeightLinear):
    """y = x (q * s)^T + b with int8 q [N, K] and per-row scales s [N] (bfloat16)."""

    method = "int8"
    scale_dtype = COMPUTE_DTYPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if HAS_INT8_KERNEL and x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(COMPUTE_DTYPE), self.qweight, self.scales)
            y = y.to(x.dtype)
        else:
            # Fallback (no kernel, or a device without it): dequantize on the fly. This makes a
            # transient float copy of the weight per call, never a kept one.
            w = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            y = F.linear(x2, w)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
