"""Quantized linears against their float references, on small random matrices.

Tolerances come from theory: round-to-nearest with step d has error d / sqrt(12) per weight, so
a layer's relative Frobenius error is sqrt(mean(d^2) / 12) / rms(w) (int8 per channel: ~0.8% for
Gaussian rows; int4 groups of 32 / 64 / 128: ~7.8 / 8.9 / 10%). The kernels compute with
bfloat16 activations (relative rounding 2^-9), which adds ~0.3% on top.
"""

from __future__ import annotations

import math

import pytest
import torch

from lamina.quant.awq import _fake_quant, search_clip, search_scale
from lamina.quant.int4 import (
    Int4Linear,
    dequantize_groupwise,
    from_kernel_layout,
    pack_nibbles,
    quantize_groupwise,
    scales_and_zeros,
    to_kernel_layout,
    unpack_nibbles,
)
from lamina.quant.int8 import Int8Linear, dequantize_per_channel, quantize_per_channel
from lamina.quant.smoothquant import smooth_scales
from lamina.quant.w8a8 import W8A8Linear, quantize_per_token

BF16_SLACK = 0.004  # what bfloat16 activations and outputs add to a relative error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on 2 shared cores, OpenMP's second thread mostly waits (10-100x slower
    under load); one thread keeps these tests fast and their timing stable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rtn_theory(step: torch.Tensor, w: torch.Tensor) -> float:
    """Expected relative error of round-to-nearest with per-weight step sizes `step`."""
    return math.sqrt(step.float().pow(2).mean().item() / 12) / w.pow(2).mean().sqrt().item()


# ---- int8 weight-only -----------------------------------------------------------------------
def test_int8_matches_float_within_theory():
    w, b, x = rand(96, 256), rand(96, seed=1), rand(2, 5, 256, seed=2)
    q, s = quantize_per_channel(w)
    theory = rtn_theory(s.float()[:, None].expand_as(w), w)
    assert theory < 0.01
    assert rel(dequantize_per_channel(q, s), w) == pytest.approx(theory, rel=0.1)
    lin = Int8Linear.from_float(w, b)
    y = lin(x)
    assert y.shape == (2, 5, 96)
    assert y.dtype == torch.float32
    assert rel(y, x @ w.t() + b) < theory + BF16_SLACK
    # the kernel computes exactly the stored weight (up to bfloat16 activations)
    assert rel(y, x @ dequantize_per_channel(q, s).t() + b) < BF16_SLACK
    assert q.abs().max() <= 127
    assert s.dtype == torch.bfloat16


def test_int8_single_row_and_state_round_trip():
    w, x = rand(64, 128), rand(1, 128, seed=3)
    lin = Int8Linear.from_float(w, None)
    other = Int8Linear(128, 64, bias=False)
    other.load_state_tensors({k: v.clone() for k, v in lin.state_tensors().items()})
    assert torch.equal(other.qweight, lin.qweight)
    assert torch.equal(other.scales, lin.scales)
    assert torch.equal(other(x), lin(x))


# ---- int4 weight-only -----------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matches_float_within_theory(group_size):
    w, b, x = rand(128, 512), rand(128, seed=1), rand(7, 512, seed=2)
    q, scales, zeros = quantize_groupwise(w, group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)
    theory = rtn_theory(step, w)
    assert theory < {32: 0.085, 64: 0.095, 128: 0.105}[group_size]
    assert rel(dequantize_groupwise(q, scales, zeros, group_size), w) == pytest.approx(
        theory, rel=0.1
    )
    lin = Int4Linear.from_float(w, b, group_size)
    assert rel(lin(x), x @ w.t() + b) < theory * 1.1 + BF16_SLACK
    assert rel(lin(x), x @ lin.dequantized().t() + b) < BF16_SLACK


def test_int4_kernel_zero_point_convention():
    """torch's kernel computes w = (q - 8) * scale + zero: multiplying the identity by the
    packed weight returns exactly our reference dequantization (to bfloat16 rounding)."""
    w = rand(32, 128)
    q, scales, zeros = quantize_groupwise(w, 32)
    eye = torch.eye(128, dtype=torch.bfloat16)
    got = torch._weight_int4pack_mm_for_cpu(
        eye, to_kernel_layout(q), 32, scales_and_zeros(scales, zeros)
    )
    ref = dequantize_groupwise(q, scales, zeros, 32).t()
    torch.testing.assert_close(got.float(), ref, rtol=2**-8, atol=1e-6)
    shifted = ((q.float() * scales.float().repeat_interleave(32, 1)).t() - ref).abs().max()
    assert shifted > 0.1  # a q * scale + zero convention would be visibly different


def test_int4_pack_unpack_round_trips_exact():
    q = torch.randint(0, 16, (48, 256), dtype=torch.uint8, generator=torch.Generator())
    packed = pack_nibbles(q)
    assert packed.shape == (48, 128)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), q)
    assert torch.equal(from_kernel_layout(to_kernel_layout(q), 256, 64), q)
    assert torch.equal(from_kernel_layout(to_kernel_layout(q), 256, 64, chunk=96), q)


def test_int4_padding_and_state_round_trip():
    """Shapes the kernel refuses (N % 16, K % group) are padded; reload is bit-identical."""
    w, b, x = rand(40, 100), rand(40, seed=1), rand(3, 100, seed=2)
    lin = Int4Linear.from_float(w, b, 64)
    assert (lin.k_pad, lin.n_pad) == (128, 48)
    y = lin(x)
    assert y.shape == (3, 40)
    assert rel(y, x @ lin.dequantized().t() + b) < BF16_SLACK
    assert rel(y, x @ w.t() + b) < 0.12
    state = lin.state_tensors()
    assert state["qweight"].shape == (48, 64)
    assert state["scales"].shape == (48, 2)
    other = Int4Linear(100, 40, True, group_size=64)
    other.load_state_tensors({k: v.clone() for k, v in state.items()})
    assert torch.equal(other.qweight, lin.qweight)
    assert torch.equal(other.scales_zeros, lin.scales_zeros)
    assert torch.equal(other(x), y)


def test_int4_rejects_unsupported_group_size():
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(64, 64, False, group_size=16)


# ---- AWQ ------------------------------------------------------------------------------------
def outlier_acts(t: int, k: int, seed: int, factor: float = 30.0) -> torch.Tensor:
    x = rand(t, k, seed=seed)
    x[:, :4] *= factor  # a few salient channels, as LLM activations have
    return x


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_beats_rtn_with_activation_outliers(group_size):
    w = rand(128, 256)
    calib, held_out = outlier_acts(512, 256, 1), outlier_acts(256, 256, 2)
    s, alpha, errors = search_scale(w, calib, calib.abs().mean(0), group_size, n_grid=20)
    assert len(errors) == 20
    assert alpha > 0
    assert min(errors) < errors[0]
    ref = held_out @ w.t()
    rtn_err = rel(held_out @ _fake_quant(w, group_size).t(), ref)
    awq_err = rel(held_out @ (_fake_quant(w * s, group_size) / s).t(), ref)
    assert awq_err < 0.7 * rtn_err
    clip = search_clip(w * s, calib / s, group_size)
    assert clip.shape == (128, 256 // group_size)
    assert clip.min() >= 0.5
    assert clip.max() <= 1
    clipped = Int4Linear.from_float(w * s, None, group_size, clip).dequantized() / s
    assert rel(held_out @ clipped.t(), ref) < awq_err * 1.02  # clipping does not hurt


def test_awq_clip_respects_rows():
    w, x = rand(64, 128), rand(64, 128, seed=1)
    clip = search_clip(w, x, 32, rows=slice(32, 64))
    assert torch.all(clip[:32] == 1)


# ---- W8A8 / SmoothQuant ---------------------------------------------------------------------
def test_int_mm_is_exact_int32():
    a = torch.randint(-127, 128, (5, 72), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 72), dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b.t()), a.int() @ b.int().t())


def test_w8a8_matches_float_without_outliers():
    w, b, x = rand(96, 256), rand(96, seed=1), rand(1, 3, 256, seed=2)
    lin = W8A8Linear.from_float(w, b)
    y = lin(x)
    assert y.shape == (1, 3, 96)
    xq, sx = quantize_per_token(x.reshape(-1, 256))
    assert xq.dtype == torch.int8
    assert sx.shape == (3, 1)
    assert rel(y, x @ w.t() + b) < 0.015  # two int8 roundings: ~0.8% each in quadrature
    other = W8A8Linear(256, 96, True)
    other.load_state_tensors({k: v.clone() for k, v in lin.state_tensors().items()})
    assert torch.equal(other(x), y)


def test_smoothquant_rescues_w8a8_from_activation_outliers():
    w = rand(128, 256)
    x = outlier_acts(64, 256, 3, factor=100.0)
    ref = x @ w.t()
    naive = rel(W8A8Linear.from_float(w, None)(x), ref)
    s = smooth_scales(x.abs().amax(0), w, alpha=0.5)
    torch.testing.assert_close((x / s) @ (w * s).t(), ref, rtol=1e-4, atol=1e-3)  # exact in float
    smoothed = rel(W8A8Linear.from_float(w * s, None)(x / s), ref)
    assert smoothed < naive / 3
    assert smoothed < 0.01
    # s balances the ranges: per channel, max|X_j / s_j| == max|W_j * s_j| at alpha = 0.5
    torch.testing.assert_close((x / s).abs().amax(0), (w * s).abs().amax(0), rtol=1e-4, atol=1e-6)


# ---- fallbacks without the torch kernels ----------------------------------------------------
def test_fallbacks_without_kernels_agree(monkeypatch):
    import lamina.quant.int4 as int4
    import lamina.quant.int8 as int8

    w, b, x = rand(64, 256), rand(64, seed=1), rand(4, 256, seed=2)
    fast4, fast8 = Int4Linear.from_float(w, b, 64), Int8Linear.from_float(w, b)
    monkeypatch.setattr(int4, "HAS_INT4_KERNEL", False)
    monkeypatch.setattr(int8, "HAS_INT8_KERNEL", False)
    slow4, slow8 = Int4Linear.from_float(w, b, 64), Int8Linear.from_float(w, b)
    assert not slow4.use_kernel
    for k, v in fast4.state_tensors().items():  # same portable checkpoint either way
        assert torch.equal(slow4.state_tensors()[k], v)
    assert rel(slow4(x), fast4(x)) < BF16_SLACK
    assert rel(slow8(x), fast8(x)) < BF16_SLACK
