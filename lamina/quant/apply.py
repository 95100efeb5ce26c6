"""`quantize_model`: swap the decoder's `Linear` modules for quantized ones, in place.

Only the four linears of each decoder layer are quantized (qkv_proj, o_proj, gate_up_proj,
down_proj); embeddings, lm_head and norms stay in the model's float dtype. The lm_head's logits
feed sampling directly and the embedding is a lookup, so both are left alone (as AutoAWQ and
SmoothQuant do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM, on_row_major_weights
from lamina.quant.awq import apply_awq
from lamina.quant.calibrate import collect_stats
from lamina.quant.int4 import GROUP_SIZES, Int4Linear
from lamina.quant.int8 import Int8Linear
from lamina.quant.smoothquant import apply_smoothquant
from lamina.quant.w8a8 import W8A8Linear

METHODS = ("int8", "rtn4", "awq", "smoothquant")
QUANT_METHOD_TAG = "lamina"  # config.json quantization_config.quant_method


@dataclass
class QuantConfig:
    """What was done to a model; written to config.json as `quantization_config`."""

    method: str  # int8 | rtn4 | awq | smoothquant
    bits: int  # weight bits
    activation_bits: int | None = None  # 8 for smoothquant (dynamic per token)
    group_size: int | None = None  # int4 only
    zero_point: bool = False  # int4: asymmetric with a float zero per group
    options: dict[str, Any] = field(default_factory=dict)  # alpha, n_grid, calib tokens, ...

    @property
    def linear_kind(self) -> str:
        return {"int8": "int8", "rtn4": "int4", "awq": "int4", "smoothquant": "w8a8"}[self.method]

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD_TAG, **asdict(self)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> QuantConfig:
        if d.get("quant_method") != QUANT_METHOD_TAG:
            raise ValueError(
                f"quantization_config.quant_method {d.get('quant_method')!r} is not lamina's "
                f"({QUANT_METHOD_TAG!r}); other formats (AutoAWQ, GPTQ) are not loaded"
            )
        keys = {"method", "bits", "activation_bits", "group_size", "zero_point", "options"}
        cfg = QuantConfig(**{k: v for k, v in d.items() if k in keys})
        validate(cfg.method, cfg.group_size)
        return cfg


def validate(method: str, group_size: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; accepted: {METHODS}")
    if method in ("rtn4", "awq") and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; accepted: {GROUP_SIZES}")


def make_config(method: str, group_size: int = 128, **options: Any) -> QuantConfig:
    validate(method, group_size)
    int4 = method in ("rtn4", "awq")
    return QuantConfig(
        method=method,
        bits=4 if int4 else 8,
        activation_bits=8 if method == "smoothquant" else None,
        group_size=group_size if int4 else None,
        zero_point=int4,
        options=options,
    )


def decoder_linears(model: LlamaForCausalLM) -> list[tuple[str, nn.Module, str]]:
    """(module path, owner module, attribute) of every decoder linear."""
    out = []
    for i, layer in enumerate(model.layers):
        for path in model.layout.fused_names:
            owner_name, attr = path.rsplit(".", 1)
            out.append((f"layers.{i}.{path}", layer.get_submodule(owner_name), attr))
    return out


def empty_linear(cfg: QuantConfig, lin: Linear, dtype: torch.dtype) -> nn.Module:
    """An unfilled quantized module shaped like `lin` (for loading a checkpoint)."""
    args = (lin.in_features, lin.out_features, lin.bias is not None, dtype)
    if cfg.linear_kind == "int4":
        return Int4Linear(*args, group_size=cfg.group_size or 128)
    return Int8Linear(*args) if cfg.linear_kind == "int8" else W8A8Linear(*args)


def _convert(cfg: QuantConfig, lin: Linear, clip: torch.Tensor | None) -> nn.Module:
    if cfg.linear_kind == "int4":
        return Int4Linear.from_float(lin.weight, lin.bias, cfg.group_size or 128, clip)
    if cfg.linear_kind == "int8":
        return Int8Linear.from_float(lin.weight, lin.bias)
    return W8A8Linear.from_float(lin.weight, lin.bias)


@on_row_major_weights
@torch.no_grad()
def quantize_model(
    model: LlamaForCausalLM,
    method: str,
    calib_ids: list[list[int]] | None = None,
    *,
    group_size: int = 128,
    alpha: float = 0.5,
    n_grid: int = 20,
    clip: bool = True,
    max_calib_rows: int = 512,
    seq_len: int = 512,
    progress: bool = True,
) -> QuantConfig:
    """Quantize the decoder linears of a loaded float model in place; return (and attach as
    `model.quant_config`) the config `save_quantized` writes.

    method: "int8" (weight-only int8), "rtn4" (int4 round-to-nearest), "awq" (int4 with AWQ
    scales and clipping; needs calib_ids), "smoothquant" (W8A8 with smoothing; needs calib_ids).
    group_size: int4 group (32, 64, 128, 256). alpha: SmoothQuant migration strength.
    n_grid / clip: AWQ's alpha grid size and whether to search clipping.
    max_calib_rows: activation rows per linear kept for AWQ's error search.
    seq_len: calibration sequences are cut to this many tokens.
    progress: tqdm bars on stderr (calibration, AWQ's search, then one per layer quantized).
    """
    validate(method, group_size)
    if any(not isinstance(getattr(o, a), Linear) for _, o, a in decoder_linears(model)):
        raise ValueError("the model is already quantized; load the float checkpoint again")
    calib = calib_ids or []
    if method in ("awq", "smoothquant") and not calib:
        raise ValueError(f"{method} needs calibration token ids (calib_ids)")
    options: dict[str, Any] = {}
    clips: dict[str, torch.Tensor] = {}
    if method == "awq":
        stats = collect_stats(model, calib, max_calib_rows, seq_len, progress)
        clips = apply_awq(model, stats, group_size, n_grid, clip, progress)
        options = {"n_grid": n_grid, "clip": clip}
    elif method == "smoothquant":
        stats = collect_stats(model, calib, 0, seq_len, progress)
        apply_smoothquant(model, stats, alpha)
        options = {"alpha": alpha}
    if method in ("awq", "smoothquant"):
        options["calib_tokens"] = sum(len(s) for s in calib)
    cfg = make_config(method, group_size, **options)
    linears = decoder_linears(model)  # layer by layer, the layout's linears in each
    step = len(model.layout.fused_names)
    bar = tqdm(
        range(0, len(linears), step),
        desc=f"{method} quantize",
        unit="layer",
        disable=not progress,
        dynamic_ncols=True,
    )
    for start in bar:
        for name, owner, attr in linears[start : start + step]:
            setattr(owner, attr, _convert(cfg, getattr(owner, attr), clips.get(name)))
    model.quant_config = cfg
    return cfg
