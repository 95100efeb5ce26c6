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

from lamina.quant.int8 import Int8WeightLinear


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


class W8A8Linear(Int8WeightLinear):
    """y = (q_x q_w^T) * s_x * s_w + b: per-token dynamic activation scales s_x [M, 1],
    per-channel weight scales s_w [N] (float32)."""

    method = "w8a8"
    scale_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, sx = quantize_per_token(x.reshape(-1, shape[-1]))
        acc = int_mm(xq, self.qweight.t())
        y = (acc.float() * sx * self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
