"""AWQ (Lin et al., 2023): activation-aware int4 weight quantization.

Channels that see large activations matter most, so each linear's input channel j is scaled up
by s_j = mean|x_j|^alpha before quantization (and x is scaled down by the same factor upstream,
see `fold.py`): salient weights then use more of the int4 grid. alpha is chosen per linear from a
grid over [0, 1] to minimise ||X Q(W diag(s))^T diag(s)^-1 ... - X W^T||, i.e. the linear's own
output error on calibration rows (alpha = 0 is plain RTN, so AWQ never does worse on them).
As in the reference implementation, s is normalised by sqrt(max(s) min(s)), and after scaling
each group's range may be clipped (searched shrink factors in [0.5, 1], per row and group) to
the value minimising the group's output error; q/k rows of qkv_proj are never clipped.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lamina.models.llama import LlamaForCausalLM
from lamina.quant.calibrate import ActStats
from lamina.quant.fold import ScaleGroup, apply_scale, scale_groups
from lamina.quant.int4 import pad_weight, padded_shape, pseudo_quantize


def _fake_quant(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """pseudo_quantize for any K: pads K to the group size and cuts the padding off again."""
    n, k = w.shape
    kp, _ = padded_shape(k, n, group_size)
    return pseudo_quantize(pad_weight(w, kp, n), group_size, clip)[:, :k]


def awq_scales(s_base: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = base^alpha, normalised so that max(s) * min(s) = 1 (as the reference code does)."""
    s = s_base.float().clamp(min=1e-4).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(
    w: torch.Tensor,
    x: torch.Tensor,
    x_absmean: torch.Tensor,
    group_size: int,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, list[float]]:
    """The per-input-channel scale minimising the output error of int4(W diag(s)) diag(s)^-1.

    w: [N, K] float weight; x: [T, K] calibration rows; x_absmean: [K] mean |x| over all tokens.
    Returns (s [K], best alpha, mean squared output error for each alpha of the grid).
    """
    w, x = w.float(), x.float()
    ref = x @ w.t()
    errors: list[float] = []
    best_s, best_alpha, best_err = torch.ones_like(x_absmean), 0.0, float("inf")
    for alpha in torch.linspace(0, 1, n_grid).tolist():
        s = awq_scales(x_absmean, alpha)
        wq = _fake_quant(w * s[None, :], group_size) / s[None, :]
        err = (x @ wq.t() - ref).pow(2).mean().item()
        errors.append(err)
        if err < best_err:
            best_s, best_alpha, best_err = s, alpha, err
    return best_s, best_alpha, errors


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows: slice | None = None,
    row_chunk: int = 256,
) -> torch.Tensor:
    """Per (row, group) factors in [1 - max_shrink, 1] for the group's [min, max] range that
    minimise that group's contribution to the output error on x. Rows outside `rows` get 1.

    Returns [N, K_pad / group_size] (the padded group count `Int4Linear.from_float` takes).
    """
    n, k = w.shape
    kp, _ = padded_shape(k, n, group_size)
    ng = kp // group_size
    wp = pad_weight(w, kp, n)
    xg = torch.nn.functional.pad(x.float(), (0, kp - k)).reshape(-1, ng, group_size)
    best = torch.ones(n, ng)
    lo, hi = (0, n) if rows is None else (rows.start, rows.stop)
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid) + 1)]
    for r0 in range(lo, hi, row_chunk):
        wc = wp[r0 : min(hi, r0 + row_chunk)]
        wcg = wc.reshape(-1, ng, group_size)
        ref = torch.einsum("tgk,ngk->ntg", xg, wcg)
        best_err = torch.full((wc.shape[0], ng), float("inf"))
        for r in ratios:
            clip = torch.full((wc.shape[0], ng), r)
            q = pseudo_quantize(wc, group_size, clip).reshape(-1, ng, group_size)
            err = (torch.einsum("tgk,ngk->ntg", xg, q) - ref).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + wc.shape[0]][better] = r
    return best


def apply_awq(
    model: LlamaForCausalLM,
    stats: dict[str, ActStats],
    group_size: int = 128,
    n_grid: int = 20,
    clip: bool = True,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales into the float model in place (its float function is kept);
    return clip factors per linear name for `Int4Linear.from_float` (empty without clip).

    o_proj is scaled only for models with num_kv_heads == num_heads (see `fold.py`).
    """
    groups: list[ScaleGroup] = scale_groups(model)
    clips: dict[str, torch.Tensor] = {}
    # Consumers first (down before gate_up, o before qkv): a fold rescales the producer's rows,
    # so each search then sees the weight that will really be quantized.
    for g in tqdm(groups[::-1], desc="AWQ search", unit="linear", disable=not progress):
        st = stats[g.name]
        x = st.samples
        s, _, _ = search_scale(g.linear.weight, x, st.absmean, group_size, n_grid)
        apply_scale(g, s)
        stats[g.name] = ActStats(st.absmax / s, st.abssum / s.double(), st.count, [x / s])
    if clip:  # after every fold, so each linear is clipped in its final form
        for g in tqdm(groups, desc="AWQ clip", unit="linear", disable=not progress):
            x = stats[g.name].samples
            clips[g.name] = search_clip(g.linear.weight, x, group_size, n_grid, rows=g.clip_rows)
    return clips
