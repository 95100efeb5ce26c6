"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per-token int8 activations fail when a few channels are ~100x larger than the rest: every
token's scale is set by the outlier and the other channels round to a handful of levels.
Dividing channel j of X by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplying W's
column j by s_j keeps X W^T exact in float while balancing the two ranges (alpha = 0.5 splits
the difficulty evenly). The division is folded into the preceding op (`fold.py`), so it costs
nothing at run time. Then weights are int8 per channel and activations int8 per token
(`w8a8.py`); norms and softmax stay float.

Which linears: the paper smooths the ones fed by a norm (qkv_proj, gate_up_proj). LLaMA's
down_proj input also carries large outliers and its scale folds exactly into the up rows, so it
is smoothed too by default (`down_proj=False` gives the paper's set); o_proj is smoothed only
for MHA models (its fold into v needs one v row per input channel).
"""

from __future__ import annotations

import torch

from lamina.models.llama import LlamaForCausalLM
from lamina.quant.calibrate import ActStats
from lamina.quant.fold import apply_scale, scale_groups


def smooth_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), for W [N, K] and max|X| [K]."""
    w_max = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def apply_smoothquant(
    model: LlamaForCausalLM,
    stats: dict[str, ActStats],
    alpha: float = 0.5,
    o_proj: bool = True,
    down_proj: bool = True,
) -> dict[str, torch.Tensor]:
    """Smooth every foldable linear of the float model in place; returns the scales used."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    used: dict[str, torch.Tensor] = {}
    # Consumers first (down before gate_up, o before qkv): a fold changes the producer's rows,
    # so each producer's max|W_j| is then read from its final weight.
    for g in reversed(scale_groups(model, o_proj=o_proj, down_proj=down_proj)):
        s = smooth_scales(stats[g.name].absmax, g.linear.weight, alpha)
        apply_scale(g, s)
        used[g.name] = s
    return used
