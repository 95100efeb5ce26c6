"""GGUF quantized weights run natively on torch's int4 CPU kernel, never dequantized to float.

Every 32-value GGUF block (and every 32-value sub-block of a K-quant super-block) stores integer
values v with one float scale s and offset o: w = s * v + o (`decode_blocks` reproduces
`gguf.quants.dequantize` bit for bit from (v, s, o)). The int4 kernel computes
w = (c - 8) * scale + zero per group of 32 with codes c in 0..15, so:

- 4-bit types (Q4_0, Q4_1, Q4_K): one code per weight, c = v - base, scale = s,
  zero = (8 + base) * s + o (base = -8 for Q4_0's signed values, else 0). Q4_0's zero is 0.
- up-to-8-bit types (Q8_0, Q5_0, Q5_1, Q5_K): v in [-128, 127] is split into a high and a low
  nibble, v = 16 * (v >> 4) + (v & 15), stored as two int4 halves of one weight [N, 2K]:
  high codes (v >> 4) + 8 with scale 16 s and zero 0, low codes v & 15 with scale s and zero
  8 s + o; the input is repeated, [x, x], so one kernel call sums both halves.

Measured on this Zen 4 at one thread for a 1536 x 576 Q8_0 weight at batch 1, the split runs in
48 us (bfloat16 F.linear on a float copy: 61 us, float32: 49 us; dequantizing per call and then
F.linear: 340 us); torch's int8 kernel has per-row scales only, so Q8_0's per-block scales would
need a lossy requantization. Q6_K, Q2_K and Q3_K (16-value sub-blocks; the kernel's smallest group
is 32) and linears whose fused parts differ in type take the float path.

Precision: the kernel wants bfloat16 scales, zeros and activations, so float16 d (11 significant
bits) rounds to bfloat16 (8): a per-block relative scale error up to 2^-9, and the output is
bfloat16. Tests bound the effect on linears and whole models.

SmolLM2-135M Q4_1 (one thread, loaded machine): decode 46 tok/s native (bfloat16 model) against
25.5 bfloat16 and 17.4 float32; 256-token prefill 400 tok/s against 780 bfloat16 (the int4 kernel
is weaker than bfloat16 GEMM at many rows); 123 MB of weights against 538 MB float32 (the
embedding, also the tied output head, stays float: 57 MB in bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lamina.config import ModelConfig
from lamina.formats import gguf as gguf_format
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.int4 import COMPUTE_DTYPE, Int4Linear

QT = gguf.GGMLQuantizationType
GROUP = 32


@dataclass
class BlockCodes:
    """w = scales * values + offsets per group of 32 input channels.

    values: int8 [N, K]; scales, offsets: float32 [N, K / 32]."""

    values: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] (the same numbers `gguf.quants.dequantize` gives)."""
        n, k = self.values.shape
        v = self.values.reshape(n, k // GROUP, GROUP).astype(np.float32)
        w: np.ndarray = (self.scales[..., None] * v + self.offsets[..., None]).reshape(n, k)
        return w


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> float32 [...] (little-endian float16)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles are values 0-15, high ones 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bits, bit i for value i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (gguf's get_scale_min)."""
    d, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mins = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def decode_blocks(data: np.ndarray, qtype: QT) -> BlockCodes:
    """Raw GGUF rows (uint8 [N, bytes per row]) of a native type -> values, scales, offsets."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = data.shape[0]
    b = data.reshape(n, -1, size)  # [N, blocks, bytes]
    zero = None
    if qtype == QT.Q8_0:
        d, v = _f16(b[..., 0:2]), b[..., 2:].view(np.int8)
    elif qtype == QT.Q4_0:
        d, v = _f16(b[..., 0:2]), _nibbles32(b[..., 2:]).astype(np.int8) - 8
    elif qtype == QT.Q4_1:
        d, zero, v = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _nibbles32(b[..., 4:])
    elif qtype == QT.Q5_0:
        v = _nibbles32(b[..., 6:]) | (_high_bits32(b[..., 2:6]) << 4)
        d, v = _f16(b[..., 0:2]), v.astype(np.int8) - 16
    elif qtype == QT.Q5_1:
        d, zero = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        v = _nibbles32(b[..., 8:]) | (_high_bits32(b[..., 4:8]) << 4)
    elif qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = _k_scale_min(b[..., 4:16])
        d = _f16(b[..., 0:2])[..., None] * sc  # [N, blocks, 8]: one per 32-value sub-block
        zero = -(_f16(b[..., 2:4])[..., None] * mn)
        qs = b[..., -128:].reshape(n, -1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
        v = (qs & 15).reshape(n, -1, 8, 32)  # chunk c of 32 bytes: sub-blocks 2c (low), 2c+1
        if qtype == QT.Q5_K:
            qh = b[..., 16:48].reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]
            v = v | ((qh & 1) << 4)  # bit i of byte j: sub-block i, value j
    else:
        raise ValueError(f"GGUF type {qtype.name} has no native kernel; accepted: {NATIVE}")
    groups = data.shape[1] // size * block // GROUP
    scales = d.reshape(n, groups).astype(np.float32)
    offsets = np.zeros_like(scales) if zero is None else zero.reshape(n, groups)
    return BlockCodes(np.asarray(v, np.int8).reshape(n, -1), scales, offsets)


# type -> base of its 4-bit values (-8 signed, 0 unsigned), or None: split into two nibbles
_FOUR_BIT = {QT.Q4_0: -8, QT.Q4_1: 0, QT.Q4_K: 0, QT.Q8_0: None, QT.Q5_0: None}
_FOUR_BIT |= {QT.Q5_1: None, QT.Q5_K: None}
NATIVE = tuple(t.name for t in _FOUR_BIT)


def int4_from_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: bool,
    dtype: torch.dtype,
) -> Int4Linear:
    """An Int4Linear holding codes [N, K] in 0..15 with per-group scales and zeros [N, K / g]
    (w = (code - 8) * scale + zero; rounded to bfloat16 by the layer). The bias, if any, is
    zero until the checkpoint's is loaded into `.bias`."""
    n, k = codes.shape
    mod = Int4Linear(k, n, bias, dtype, group_size=group_size)
    pad = mod.n_pad - n  # padded rows: code 8, scale 0, zero 0 -> weight 0
    # _set_codes rather than load_state_tensors: the portable nibble packing round trip
    # would cost ~40% of the load time for nothing
    if pad:
        codes = F.pad(codes.to(torch.uint8), (0, 0, 0, pad), value=8)
        scales, zeros = F.pad(scales.float(), (0, 0, 0, pad)), F.pad(zeros.float(), (0, 0, 0, pad))
    mod._set_codes(codes.to(torch.uint8), scales.to(COMPUTE_DTYPE), zeros.to(COMPUTE_DTYPE))
    return mod


def _int4(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bias: bool, dtype: torch.dtype
) -> Int4Linear:
    t = torch.from_numpy
    return int4_from_codes(t(codes), t(scales), t(zeros), GROUP, bias, dtype)


class SplitInt8Linear(nn.Module):
    """Up-to-8-bit values with per-32 scales as two int4 halves: y = int4([x, x]) (+ b).

    Per weight: two 4-bit codes plus, per 32 weights, a bfloat16 scale and zero for each half:
    10 bits (Q8_0 itself: 8.5)."""

    method = "gguf_int8x2"

    def __init__(self, inner: Int4Linear, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features // 2, inner.out_features
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(COMPUTE_DTYPE)
        y: torch.Tensor = self.inner(torch.cat([xb, xb], dim=-1)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def native_linear(codes: BlockCodes, qtype: QT, bias: bool, dtype: torch.dtype) -> nn.Module:
    """The module that runs `codes` (decoded from `qtype` blocks) on the int4 kernel."""
    v, s, o = codes.values, codes.scales, codes.offsets
    base = _FOUR_BIT[qtype]
    if base is not None:
        return _int4((v - base).astype(np.uint8), s, (8 + base) * s + o, bias, dtype)
    hi = ((v >> 4) + 8).astype(np.uint8)  # arithmetic shift: v >> 4 in -8..7
    lo = (v & 15).astype(np.uint8)
    inner = _int4(
        np.concatenate([hi, lo], axis=1),
        np.concatenate([16 * s, s], axis=1),
        np.concatenate([np.zeros_like(s), 8 * s + o], axis=1),
        False,
        dtype,
    )
    return SplitInt8Linear(inner, bias, dtype)


class GGUFRowTable(nn.Module):
    """An embedding table kept as the GGUF file's quantized rows; a lookup dequantizes only the
    rows asked for, with the same `gguf` function the loader uses for the whole table, so the
    values are exactly those of the dense table. An untied model needs no dense embedding at
    all; a tied one drops it once the LM head is packed (`LlamaForCausalLM.pack_weights`).
    SmolLM2's Q8_0 table is 30 MB where the dense one is 57 MB in bf16 and 113 MB in float32."""

    rows: torch.Tensor  # buffer, registered in __init__

    def __init__(self, rows: np.ndarray, qtype: gguf.GGMLQuantizationType, dtype: torch.dtype):
        super().__init__()
        self.qtype = qtype
        self.dtype = dtype
        # a copy: the reader's arrays are read-only views of the memory-mapped file
        self.register_buffer("rows", torch.from_numpy(np.array(rows, copy=True)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        picked = self.rows[ids.reshape(-1)].numpy()
        values = gguf.quants.dequantize(picked, self.qtype).astype(np.float32, copy=False)
        return torch.from_numpy(values).to(self.dtype).reshape(*ids.shape, -1)


# quantized embedding types worth keeping as rows (smaller than bf16; the float types are not)
_COMPACT_ROWS = {
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q6_K,
    gguf.GGMLQuantizationType.Q5_0,
    gguf.GGMLQuantizationType.Q5_1,
    gguf.GGMLQuantizationType.Q5_K,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
    gguf.GGMLQuantizationType.Q4_K,
}


@torch.no_grad()
def load_gguf_native(
    net: LlamaForCausalLM, reader: gguf.GGUFReader, config: ModelConfig, dtype: torch.dtype
) -> dict[str, str]:
    """Fill `net` from a GGUF file, running every decoder linear whose parts share a native
    type (`NATIVE`) on the int4 kernel; the rest (embedding, output head, norms, biases, other
    types) is dequantized as usual. Returns {module path: GGUF type} of the native linears."""
    tensors = {t.name: t for t in reader.tensors}
    native: dict[str, str] = {}
    skip: set[str] = set()
    held: set[str] = set()
    for i, layer in enumerate(net.layers):
        for m in net.layout.modules:
            names = [gguf_format.gguf_name(i, part) for part in m.parts]
            if any(n not in tensors for n in names):
                continue  # load_weights names what is missing
            qtypes = {tensors[n].tensor_type for n in names}
            qtype = qtypes.pop()
            if qtypes or qtype not in _FOUR_BIT:
                continue
            rows = []
            for part, name in zip(m.parts, names):
                data = np.asarray(tensors[name].data)
                heads = gguf_format.permuted_heads(config, part)
                if heads is not None:  # quantized blocks are whole rows: permute them as rows
                    data = gguf_format.unpermute_qk(data, heads)
                rows.append(decode_blocks(data, qtype))
            codes = BlockCodes(
                np.concatenate([r.values for r in rows]),
                np.concatenate([r.scales for r in rows]),
                np.concatenate([r.offsets for r in rows]),
            )
            bias = gguf_format.gguf_name(i, m.parts[0], "bias") in tensors
            layer.set_submodule(m.fused, native_linear(codes, qtype, bias, dtype))
            native[f"layers.{i}.{m.fused}"] = qtype.name
            skip.update(names)
            held.update(f"model.layers.{i}.{part}.weight" for part in m.parts)
    net.load_weights(gguf_format.iter_gguf_tensors(reader, config, dtype, skip=skip), held)
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and embedding.tensor_type in _COMPACT_ROWS:
        net.embed_lookup = GGUFRowTable(np.asarray(embedding.data), embedding.tensor_type, dtype)
        if net.lm_head is not None:  # untied: the dense table only served lookups
            net.embed_tokens = nn.Parameter(net.embed_tokens.new_empty(0), requires_grad=False)
    net.gguf_native = native
    return native


def model_bytes(net: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what its weights cost in memory), including
    weights packed for oneDNN (`Linear.pack`, `pack_weights`)."""
    tensors = list(net.parameters()) + list(net.buffers())
    seen: dict[int, int] = {}
    for t in tensors:  # shared storage (tied embeddings) counted once
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    packed: list[torch.Tensor | None] = [getattr(m, "packed", None) for m in net.modules()]
    packed.append(getattr(net, "packed_lm_head", None))
    return sum(seen.values()) + sum(p.numel() * p.element_size() for p in packed if p is not None)
