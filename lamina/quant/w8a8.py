"""W8A8 linear (SmoothQuant's execution side): int8 weights per output channel, int8
activations per token quantized on the fly, an int8 x int8 -> int32 GEMM, then a float rescale.

`torch._int_mm(a int8 [M, K], b int8 [K, N]) -> int32 [M, N]` is the GEMM. On CPU in torch 2.13
it accepts any M, K, N (checked M = 1, K = 63, N = 65; CUDA wants M > 16 and K, N multiples of
8, which is why `int_mm` pads M there). Passing the [N, K] weight transposed as a view is ~2x
faster than a contiguous [K, N] copy, so weights stay row-major. Bias, norms and softmax stay
float: only the two operands of this matmul are int8.
"""

from __future__ import annotations

import torch
from torch import nn

from lamina.quant.base import aligned, check_shape


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], scales float32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8 of a [M, K] activation: (q int8, scales float32 [M, 1])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32, padding M where the device's kernel needs it."""
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)


class W8A8Linear(nn.Module):
    """y = (q_x q_w^T) * s_x * s_w + b: per-token dynamic activation scales s_x [M, 1],
    per-channel weight scales s_w [N] (float32)."""

    method = "w8a8"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> W8A8Linear:
        n, k = weight.shape
        dtype = bias.dtype if bias is not None else weight.dtype
        mod = cls(k, n, bias is not None, dtype)
        mod.qweight, mod.scales = quantize_weight(weight)
        if bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, sx = quantize_per_token(x.reshape(-1, shape[-1]))
        acc = int_mm(xq, self.qweight.t())
        y = (acc.float() * sx * self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias.data
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_shape("qweight", tensors["qweight"], self.qweight.shape)
        check_shape("scales", tensors["scales"], self.scales.shape)
        self.qweight = aligned(tensors["qweight"].to(torch.int8))
        self.scales = aligned(tensors["scales"].float())
        if self.bias is not None:
            self.bias.data = tensors["bias"].to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
