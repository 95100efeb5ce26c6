"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs") and `prune_model`.

Wanda scores each weight by |W_ij| * ||X_j||_2, the norm of input feature j over all
calibration tokens: a small weight on a channel that carries large activations (LLMs have a
few such outlier channels) moves the output more than a larger weight on a quiet channel, so
magnitude alone prunes the wrong weights. No weight update and no second-order solve (unlike
SparseGPT): one statistic per input channel, one sort per row.

Calibration is sequential, as in the paper's code: the statistics of layer l come from the
calibration tokens run through layers < l *already pruned*, so later layers are pruned for
the inputs they will actually see. lamina's decoder layers are plain modules called as
`layer(positions, h, kv, meta)`, so this costs two forward passes of one layer per layer (one
to collect the inputs' norms, one through the pruned layer for the next layer's input) = two
forward passes of the model, with the calibration hidden states held in memory
(tokens x hidden floats). `sequential=False` reuses the dense outputs instead: the statistics
of the dense model, one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lamina.attention.metadata import AttentionMetadata
from lamina.kv.cache import KVCache
from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM, on_row_major_weights
from lamina.prune.magnitude import (
    GROUPS,
    apply_mask,
    decoder_linears,
    magnitude_prune_layer,
    prune_mask,
    shard_rows,
    sparsity_of,
)
from lamina.quant.calibrate import split_ids

METHODS = ("wanda", "magnitude")
DEFAULT_GROUP = {"wanda": "row", "magnitude": "layer"}  # as the paper compares them


@dataclass(frozen=True)
class PruneConfig:
    """What was done to a model; written to config.json as `pruning_config`."""

    method: str  # wanda | magnitude
    sparsity: float  # fraction of decoder-linear weights pruned (N:M: 1 - N/M)
    n_m: str | None = None  # "2:4" for semi-structured, None for unstructured
    group: str = "row"  # comparison group of unstructured pruning: row | layer
    calib_tokens: int | None = None  # wanda only
    calib_sequences: int | None = None
    sequential: bool | None = None  # wanda: statistics through the already-pruned layers

    def to_json(self) -> dict[str, Any]:
        out = {"structure": "n:m" if self.n_m else "unstructured", **self.__dict__}
        return {k: v for k, v in out.items() if v is not None}


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2 (float32), the paper's equation 1."""
    return weight.detach().abs().float() * input_norm.float()[None, :]


# a scratch KV cache and its prefill metadata, per calibration sequence length
_Scratch = tuple[KVCache, AttentionMetadata]


def _scratch_cache(model: LlamaForCausalLM, n: int, block_size: int = 16) -> _Scratch:
    """A throwaway paged KV cache and prefill metadata for one n-token sequence."""
    blocks = -(-n // block_size)
    cache = KVCache(model.config, blocks, block_size, model.dtype)
    meta = AttentionMetadata.build([n], [n], [list(range(blocks))], block_size)
    return cache, meta


@torch.inference_mode()
def _run_layer(
    model: LlamaForCausalLM, i: int, hs: list[torch.Tensor], caches: dict[int, _Scratch]
) -> list[torch.Tensor]:
    """Layer i applied to each calibration sequence's hidden states (one prefill each)."""
    layer = model.decoder_layers[i]
    out: list[torch.Tensor] = []
    for h in hs:
        n = h.shape[0]
        if n not in caches:
            caches[n] = _scratch_cache(model, n)
        cache, meta = caches[n]
        out.append(layer(torch.arange(n), h, cache.layer(i), meta))
    return out


def _input_norms(
    model: LlamaForCausalLM, i: int, hs: list[torch.Tensor], caches: dict[int, _Scratch]
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """||X_j||_2 over all tokens for every linear of layer i, and the layer's outputs."""
    sumsq: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[Linear, tuple[torch.Tensor, ...]], None]:
        def fn(mod: Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, mod.in_features).float()
            sumsq[name] = sumsq.get(name, 0) + x.square().sum(0, dtype=torch.float64)

        return fn

    linears = decoder_linears(model, i)
    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        outs = _run_layer(model, i, hs, caches)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sumsq.items()}, outs


@on_row_major_weights
@torch.no_grad()
def prune_model(
    model: LlamaForCausalLM,
    method: str = "wanda",
    calib_ids: list[list[int]] | None = None,
    *,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    group: str | None = None,
    sequential: bool = True,
    seq_len: int = 512,
    progress: bool = True,
) -> PruneConfig:
    """Zero weights of every decoder linear of a loaded float model in place; return (and
    attach as `model.prune_config`) the config `save_pruned` writes.

    method: "wanda" (needs calib_ids, token-id sequences) or "magnitude" (|W|, no data).
    sparsity: fraction pruned (unstructured); n_m: (N, M) keeps N of every M instead.
    group: comparison group of unstructured pruning, "row" or "layer" (default: row for
        wanda, layer for magnitude, the paper's pairing). Ignored for N:M.
    sequential: wanda statistics through the already-pruned earlier layers (the paper's way);
        False: statistics of the dense model.
    seq_len: calibration sequences are cut to this many tokens.
    Embeddings, lm_head and norms are never pruned.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; accepted: {METHODS}")
    group = group or DEFAULT_GROUP[method]
    if group not in GROUPS:
        raise ValueError(f"unknown comparison group {group!r}; accepted: {GROUPS}")
    if n_m is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if n_m is not None and not 0 < n_m[0] < n_m[1]:
        raise ValueError(f"N:M needs 0 < N < M, got {n_m}")
    unstructured = None if n_m is not None else sparsity
    if method == "wanda" and not calib_ids:
        raise ValueError("wanda needs calibration token ids (calib_ids)")
    num_layers = len(model.layers)
    for i in range(num_layers):  # fail before touching anything if a layer is not float
        decoder_linears(model, i)
    calib: dict[str, Any] = {}
    if method == "magnitude":
        for i in tqdm(
            range(num_layers), desc="magnitude pruning", unit="layer", disable=not progress
        ):
            magnitude_prune_layer(model, i, unstructured, n_m, group)
    else:
        seqs = split_ids(calib_ids or [], min(seq_len, model.config.max_position_embeddings))
        if not seqs:
            raise ValueError("wanda needs at least one calibration token")
        caches: dict[int, _Scratch] = {}
        with torch.inference_mode():
            hs = [model.embed(torch.tensor(s)) for s in seqs]
        for i in tqdm(range(num_layers), desc="wanda pruning", unit="layer", disable=not progress):
            norms, dense_out = _input_norms(model, i, hs, caches)
            for path, lin in decoder_linears(model, i).items():
                score = wanda_score(lin.weight, norms[path])
                apply_mask(
                    lin, prune_mask(score, unstructured, n_m, group, shard_rows(model, path))
                )
            hs = _run_layer(model, i, hs, caches) if sequential else dense_out
        calib = {
            "calib_tokens": sum(len(s) for s in seqs),
            "calib_sequences": len(seqs),
            "sequential": sequential,
        }
    cfg = PruneConfig(
        method=method,
        sparsity=round(1 - n_m[0] / n_m[1], 6) if n_m else sparsity,
        n_m=f"{n_m[0]}:{n_m[1]}" if n_m else None,
        group="row" if n_m else group,
        **calib,
    )
    model.prune_config = cfg
    return cfg


__all__ = ["METHODS", "PruneConfig", "prune_model", "sparsity_of", "wanda_score"]
