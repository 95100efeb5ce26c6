"""Weight-only int4 linear: group-wise asymmetric quantization (scale + zero per group).

Convention (torch's int4 CPU kernel, checked numerically in tests): a weight is
`w = (q - 8) * scale + zero` with q in [0, 15], i.e. `zero` is the float value of the group's
middle code, so a group [min, max] has scale = (max - min) / 15 and zero = min + 8 * scale.

Kernels: `torch._convert_weight_to_int4pack_for_cpu(q_int32[N, K], inner_k_tiles)` packs the
codes into a blocked layout that depends on the CPU's ISA (AVX-512 vs AVX2 blocks), and
`torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros[K/G, N, 2])` runs the
matmul; it needs N % 16 == 0, K % group_size == 0, group_size in {32, 64, 128, 256}, and is
vectorised only for bfloat16 activations (float32 ~40x slower), so activations are cast to
bfloat16 around the call. Because the packed layout is ISA-specific, checkpoints store the codes
in a portable nibble packing (`pack_nibbles`) and re-pack on load; that is deterministic, so a
reload gives the same kernel tensors. Shapes the kernel refuses are zero-padded (K to a multiple
of the group size, N to a multiple of 16); padded inputs are zero so the padding adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamina.quant.base import check_shape

COMPUTE_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128, 256)
N_ALIGN = 16
HAS_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu"
)


def padded_shape(in_features: int, out_features: int, group_size: int) -> tuple[int, int]:
    """(K, N) after padding to what the kernel accepts."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; accepted: {GROUP_SIZES}")
    k = -(-in_features // group_size) * group_size
    n = -(-out_features // N_ALIGN) * N_ALIGN
    return k, n


def pad_weight(w: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Zero-pad a [N0, K0] weight to [n, k] (float32)."""
    w = w.float()
    return F.pad(w, (0, k - w.shape[1], 0, n - w.shape[0])) if w.shape != (n, k) else w


def quantize_groupwise(
    w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 per group of `group_size` input channels.

    w: [N, K] with K % group_size == 0. clip: optional [N, K / group_size] factors in (0, 1]
    that shrink each group's [min, max] range (AWQ's clipping search).
    Returns q (uint8 [N, K], values 0..15), scales and zeros (bfloat16 [N, K / group_size]).
    Scale and zero are rounded to bfloat16 before q is computed, so the stored numbers are
    exactly the ones the codes were chosen for.
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    hi, lo = wg.amax(-1), wg.amin(-1)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).to(COMPUTE_DTYPE)
    zero = (lo + 8.0 * scale.float()).to(COMPUTE_DTYPE)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8.0
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, zero


def dequantize_groupwise(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 [N, K] from codes and per-group parameters (the reference the kernel must match)."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    w = (qg - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def pseudo_quantize(
    w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize (float32): what the int4 layer will compute with."""
    return dequantize_groupwise(*quantize_groupwise(w, group_size, clip), group_size)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Portable packing: [N, K] codes -> uint8 [N, K / 2], even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [N, K / 2] -> uint8 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def to_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> the CPU kernel's packed weight (ISA-specific layout)."""
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and zeros -> the kernel's [G, N, 2] tensor."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def from_kernel_layout(
    packed: torch.Tensor, k: int, group_size: int, chunk: int = 1024
) -> torch.Tensor:
    """Recover codes [N, K] from the kernel layout without knowing it: multiply rows of the
    identity by a weight with scale 1 and zero 8, which gives (q - 8) * 1 + 8 = q exactly in
    bfloat16 (in chunks of rows, so large K never needs a K x K identity at once)."""
    n = packed.shape[0]
    sz = torch.ones(k // group_size, n, 2, dtype=COMPUTE_DTYPE)
    sz[..., 1] = 8.0
    out = torch.empty(n, k, dtype=torch.uint8)
    for r0 in range(0, k, chunk):
        rows = min(chunk, k - r0)
        eye = torch.zeros(rows, k, dtype=COMPUTE_DTYPE)
        eye[:, r0 : r0 + rows].fill_diagonal_(1.0)
        q = torch._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)
        out[:, r0 : r0 + rows] = q.t().round().to(torch.uint8)
    return out


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as group-wise int4 codes (see the module docstring)."""

    method = "int4"
    qweight: torch.Tensor  # buffers, registered in __init__
    scales_zeros: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        group_size: int = 128,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.k_pad, self.n_pad = padded_shape(in_features, out_features, group_size)
        self.use_kernel = HAS_INT4_KERNEL
        groups = self.k_pad // group_size
        # With the kernel, qweight is its packed layout; without, the portable nibble packing.
        self.register_buffer("qweight", torch.zeros(self.n_pad, self.k_pad // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales_zeros", torch.zeros(groups, self.n_pad, 2, dtype=COMPUTE_DTYPE)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int = 128,
        clip: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Quantize a float [N, K] weight (RTN, or with AWQ's per-group clip factors
        [N, K_pad / group_size])."""
        n, k = weight.shape
        dtype = bias.dtype if bias is not None else weight.dtype
        mod = cls(k, n, bias is not None, dtype, group_size)
        w = pad_weight(weight, mod.k_pad, mod.n_pad)
        if clip is not None and clip.shape[0] != mod.n_pad:
            clip = F.pad(clip, (0, 0, 0, mod.n_pad - clip.shape[0]), value=1.0)
        mod._set_codes(*quantize_groupwise(w, group_size, clip))
        if bias is not None and mod.bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    def _set_codes(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.qweight = to_kernel_layout(q) if self.use_kernel else pack_nibbles(q)
        self.scales_zeros = scales_and_zeros(scales, zeros)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [N_pad, K_pad] (unpacked; for checkpoints and tests)."""
        if self.use_kernel:
            return from_kernel_layout(self.qweight, self.k_pad, self.group_size)
        return unpack_nibbles(self.qweight)

    def dequantized(self) -> torch.Tensor:
        """float32 [out, in] weight this layer computes with (reference and tests only)."""
        sz = self.scales_zeros.transpose(0, 1)
        w = dequantize_groupwise(self.codes(), sz[..., 0], sz[..., 1], self.group_size)
        return w[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        if self.use_kernel and x2.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(
                x2.to(COMPUTE_DTYPE), self.qweight, self.group_size, self.scales_zeros
            )
        else:  # no kernel: a transient dequantized weight per call (never kept)
            sz = self.scales_zeros.transpose(0, 1)
            codes = unpack_nibbles(self.qweight)
            w = dequantize_groupwise(codes, sz[..., 0], sz[..., 1], self.group_size)
            y = F.linear(x2.float(), w)
        if self.n_pad != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    # ---- checkpoint --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Portable form: nibble-packed codes [N_pad, K_pad / 2], scales and zeros [N_pad, G]."""
        sz = self.scales_zeros.transpose(0, 1)
        out = {
            "qweight": pack_nibbles(self.codes()),
            "scales": sz[..., 0].contiguous(),
            "zeros": sz[..., 1].contiguous(),
        }
        if self.bias is not None:
            out["bias"] = self.bias.data
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        groups = self.k_pad // self.group_size
        check_shape("qweight", tensors["qweight"], (self.n_pad, self.k_pad // 2))
        check_shape("scales", tensors["scales"], (self.n_pad, groups))
        check_shape("zeros", tensors["zeros"], (self.n_pad, groups))
        q = unpack_nibbles(tensors["qweight"].to(torch.uint8))
        scales = tensors["scales"].to(COMPUTE_DTYPE)
        self._set_codes(q, scales, tensors["zeros"].to(COMPUTE_DTYPE))
        if self.bias is not None:
            self.bias.data = tensors["bias"].to(self.bias.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )
