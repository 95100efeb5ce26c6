"""RMSNorm (Zhang & Sennrich, 2019) as LLaMA uses it: y = w * x / sqrt(mean(x^2) + eps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """torch's fused kernel: one op instead of six (it matters at 60 norms per decoded token).

    It accumulates in float32 for every input dtype. In float32 it equals the reference
    formula; in bfloat16 it applies the weight before the final rounding, where transformers
    rounds first and then scales (results differ by at most one bf16 ulp).
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
