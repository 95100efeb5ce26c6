"""Which weights to zero, given a score per weight, and the magnitude baseline (score = |W|).

Three comparison groups, as in Wanda (Sun et al., 2023, section 3 and table 6):

- `row`: each output row loses exactly the same number of weights. The paper's choice for Wanda:
  a row is one output's dot product, so equal sparsity per row keeps every output alive.
- `layer`: one threshold over a whole weight matrix (the classic magnitude baseline the paper
  compares against). lamina fuses q/k/v and gate/up into one matrix; their shards are still
  separate groups here, so results equal pruning the unfused Hugging Face matrices.
- N:M (e.g. 2:4): in every run of M consecutive input weights of a row keep the N highest
  scores; the layout sparse tensor cores accelerate. It is per row by construction.

Masks are boolean tensors shaped like the weight, True where the weight is pruned. Counts are
exact (top-k, not a threshold), so ties never change the sparsity.
"""

from __future__ import annotations

import torch

from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM

GROUPS = ("row", "layer")


def parse_n_m(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): N kept of every M (NVIDIA's and the paper's convention)."""
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"N:M must look like '2:4', got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {text!r}")
    return n, m


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(in_features * sparsity) lowest scores of every row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros(score.shape, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False, sorted=False).indices, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole matrix.

    A k-th value threshold, not a top-k (4x faster on a 1M-weight matrix); weights tied with
    the threshold (common: GGUF-dequantized weights sit on a grid) are pruned first-come until
    the count is exact."""
    k = int(score.numel() * sparsity)
    flat = score.flatten()
    if k == 0:
        return torch.zeros(score.shape, dtype=torch.bool)
    thr = flat.kthvalue(k).values
    mask = flat < thr
    short = k - int(mask.sum())
    if short > 0:
        mask[(flat == thr).nonzero().squeeze(1)[:short]] = True
    return mask.view(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores of a row; prune the other m - n."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features ({cols}) divisible by M ({m})")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices, True)
    return mask.view(rows, cols)


def prune_mask(
    score: torch.Tensor,
    sparsity: float | None,
    n_m: tuple[int, int] | None,
    group: str,
    shards: list[int],
) -> torch.Tensor:
    """The mask for one (possibly fused) weight; `shards` are the row counts of its unfused
    matrices, which only the `layer` group needs."""
    if n_m is not None:
        return nm_mask(score, *n_m)
    assert sparsity is not None
    if group == "row":
        return row_mask(score, sparsity)
    if group != "layer":
        raise ValueError(f"unknown comparison group {group!r}; accepted: {GROUPS}")
    if len(shards) == 1:
        return layer_mask(score, sparsity)
    return torch.cat([layer_mask(s, sparsity) for s in torch.split(score, shards, dim=0)])


def decoder_linears(model: LlamaForCausalLM, layer: int) -> dict[str, Linear]:
    """Module path -> Linear of the four linears of one decoder layer."""
    out = {}
    for path in model.layout.fused_names:
        lin = model.layers[layer].get_submodule(path)
        if not isinstance(lin, Linear):
            raise ValueError(f"layers.{layer}.{path} is {type(lin).__name__}, not a float Linear")
        out[f"layers.{layer}.{path}"] = lin
    return out


def shard_rows(model: LlamaForCausalLM, path: str) -> list[int]:
    """Row counts of the Hugging Face matrices the linear at `path` ("layers.{i}.{fused}")
    holds (q/k/v, gate/up fused)."""
    return model.layout.shard_sizes(path.split(".", 2)[2])


@torch.no_grad()
def apply_mask(linear: Linear, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place (the bias stays: it is not a connection)."""
    linear.weight.data.masked_fill_(mask, 0)


@torch.no_grad()
def magnitude_prune_layer(
    model: LlamaForCausalLM,
    layer: int,
    sparsity: float | None,
    n_m: tuple[int, int] | None,
    group: str = "layer",
) -> None:
    """Prune one decoder layer's linears by |W| alone (no data)."""
    for path, lin in decoder_linears(model, layer).items():
        score = lin.weight.detach().abs().float()
        apply_mask(lin, prune_mask(score, sparsity, n_m, group, shard_rows(model, path)))


def sparsity_of(model: LlamaForCausalLM) -> float:
    """Fraction of zero weights over all decoder linears."""
    zeros = total = 0
    for i in range(len(model.layers)):
        for lin in decoder_linears(model, i).values():
            weight = lin.dense_weight()
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / max(total, 1)
