"""AutoAWQ checkpoints (the Hugging Face ecosystem's "awq" folders, GEMM version) as Int4Linear.

Format (AutoAWQ's `WQLinear_GEMM`, read by transformers and vLLM alike): config.json has
`quantization_config: {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true,
"version": "gemm"}`; each quantized linear `<prefix>` of in x out features stores

- `<prefix>.qweight` int32 [in, out / 8]: 4-bit codes q, transposed (input rows);
- `<prefix>.qzeros`  int32 [in / G, out / 8]: 4-bit zero points z per group of G inputs;
- `<prefix>.scales`  float16 [in / G, out]: scales s;
- `<prefix>.bias`    float16 [out], if the linear has one;

and the weight is w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]. Packing: the int32 at
packed column c holds output columns 8c .. 8c + 7, nibble k (bits 4k .. 4k + 3) holding column
8c + AWQ_ORDER[k] with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (an interleave that suits AutoAWQ's
CUDA dequantizer); unpacking reads the nibbles and reorders them with the inverse permutation.

lamina's int4 kernel computes w = (q - 8) * scale + zero, so scale = s and zero = (8 - z) * s,
both rounded to bfloat16 by Int4Linear (float16 s has 3 more mantissa bits: a relative scale
error up to 2^-9). q/k/v and gate/up are fused by stacking their rows. A fused linear whose parts
are not all quantized (AutoAWQ's `modules_to_not_convert`) is dequantized to float instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from lamina.formats import hf
from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.base import check_shape
from lamina.quant.gguf_native import int4_from_codes
from lamina.quant.int4 import GROUP_SIZES

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed int32 holds column AWQ_ORDER[k]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j is in nibble AWQ_REVERSE_ORDER[j]
ACCEPTED_VERSIONS = ("gemm",)
_QUANT_LEAVES = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class AwqConfig:
    """The validated `quantization_config` of an AutoAWQ checkpoint."""

    group_size: int
    bits: int = 4
    version: str = "gemm"


def parse_awq_config(qc: dict[str, Any]) -> AwqConfig:
    """Check an AutoAWQ `quantization_config`, naming what lamina accepts when it cannot run it."""
    version = str(qc.get("version", "gemm")).lower()
    if version not in ACCEPTED_VERSIONS:
        raise ValueError(
            f"AutoAWQ version {version!r} is not supported; accepted: {ACCEPTED_VERSIONS} "
            "(GEMV / ExLlama / Marlin checkpoints pack differently; re-export with version='gemm')"
        )
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"AutoAWQ bits={bits} is not supported; accepted: 4")
    if not qc.get("zero_point", True):
        raise ValueError("AutoAWQ zero_point=false is not supported; accepted: zero_point=true")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if group not in GROUP_SIZES:
        raise ValueError(f"AutoAWQ group_size {group} is not supported; accepted: {GROUP_SIZES}")
    return AwqConfig(group_size=group, bits=bits, version=version)


def awq_config_of(folder: str | Path) -> AwqConfig | None:
    """The AutoAWQ config of a model folder, None if it is not an "awq" checkpoint."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = hf.read_json(path).get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "awq":
        return None
    return parse_awq_config(qc)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [R, C / 8] -> uint8 codes [R, C] in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[..., None] >> shifts) & 15  # [R, C/8, 8], nibble order
    order = torch.tensor(AWQ_REVERSE_ORDER)
    return nibbles[..., order].reshape(packed.shape[0], -1).to(torch.uint8)


def awq_to_int4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AutoAWQ linear -> (codes uint8 [out, in], scales, zeros float32 [out, in / G]) in
    lamina's int4 convention w = (code - 8) * scale + zero."""
    q = unpack_int4_columns(qweight)  # [in, out]
    z = unpack_int4_columns(qzeros).float()  # [in / G, out]
    s = scales.float()
    return q.t().contiguous(), s.t().contiguous(), ((8.0 - z) * s).t().contiguous()


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 [out, in] weight of one AutoAWQ linear: (q - z) * s."""
    q = unpack_int4_columns(qweight).float()
    z = unpack_int4_columns(qzeros).float().repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).t().contiguous()


class _Tensors:
    """Name -> tensor over every safetensors file of a folder, opened once (memory-mapped)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.where: dict[str, Any] = {}
        for file in hf.safetensors_files(folder):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            self.where.update(dict.fromkeys(handle.keys(), handle))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"AutoAWQ checkpoint is missing tensor {name}")
        tensor: torch.Tensor = self.where[name].get_tensor(name)
        return tensor


def _checked(
    src: _Tensors, prefix: str, in_f: int, out_f: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qweight, qzeros, scales = (src[f"{prefix}.{leaf}"] for leaf in _QUANT_LEAVES)
    check_shape(f"{prefix}.qweight", qweight, (in_f, out_f // 8))
    check_shape(f"{prefix}.qzeros", qzeros, (in_f // group, out_f // 8))
    check_shape(f"{prefix}.scales", scales, (in_f // group, out_f))
    return qweight, qzeros, scales


@torch.no_grad()
def load_autoawq(net: LlamaForCausalLM, folder: str | Path, cfg: AwqConfig) -> dict[str, str]:
    """Fill a freshly built model from an AutoAWQ GEMM folder: fully quantized decoder linears
    become Int4Linear (fused), everything else loads as float. Returns {module path: "awq"}."""
    folder, group = Path(folder), cfg.group_size
    native: dict[str, str] = {}
    held: set[str] = set()
    to_float: list[tuple[str, int, int]] = []  # quantized parts of partly quantized linears
    with ExitStack() as stack:
        src = _Tensors(folder, stack)
        for i, layer in enumerate(net.layers):
            for fused in net.layout.fused_names:
                lin = cast(Linear, layer.get_submodule(fused))  # a freshly built model's
                prefixes = [f"model.layers.{i}.{p}" for p in net.layout.checkpoint_parts(fused)]
                quant = [f"{p}.qweight" in src for p in prefixes]
                sizes = net.layout.shard_sizes(fused)
                if not all(quant):
                    to_float += [
                        (p, lin.in_features, n) for p, n, q in zip(prefixes, sizes, quant) if q
                    ]
                    continue
                pieces = [
                    awq_to_int4(*_checked(src, p, lin.in_features, n, group))
                    for p, n in zip(prefixes, sizes)
                ]
                codes, scales, zeros = (torch.cat(x) for x in zip(*pieces))
                mod = int4_from_codes(codes, scales, zeros, group, lin.bias is not None, net.dtype)
                layer.set_submodule(fused, mod)
                native[f"layers.{i}.{fused}"] = "awq"
                held.update(f"{p}.weight" for p in prefixes)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name in src.where:
                if name.rsplit(".", 1)[-1] not in _QUANT_LEAVES:
                    yield name, src[name]
            for prefix, in_f, out_f in to_float:
                w = dequantize_awq(*_checked(src, prefix, in_f, out_f, group), group)
                yield f"{prefix}.weight", w

        net.load_weights(weights(), held)
    net.awq_native = native
    return native
