"""AutoAWQ GEMM checkpoints (lamina.quant.autoawq): packing on hand-made numbers, and a tiny
transformers model quantized and packed here (a packer written independently of lamina's
unpacker, following AutoAWQ's `WQLinear_GEMM.from_linear`) that lamina must load.

Tolerances: unpacking is exact; lamina's int4 convention reproduces (q - z) * s within float32
rounding; whole models give logits within 0.2 of a float32 transformers model holding the
dequantized weights (logits std ~1.6; measured 0.10, and rounding only the float model's linear
inputs and outputs to bfloat16, as the int4 kernel does, alone moves them by 0.08-0.14).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lamina import LLM, SamplingParams
from lamina.layers.linear import Linear
from lamina.quant.autoawq import (
    awq_to_int4,
    dequantize_awq,
    parse_awq_config,
    unpack_int4_columns,
)
from lamina.quant.int4 import Int4Linear

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order (independent copy)
GROUP = 32
PROMPT = [1, 40, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 7, 200, 13]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- an independent AutoAWQ packer (loops, as in AutoAWQ's from_linear) ----------------------
def awq_pack(intweight: np.ndarray) -> torch.Tensor:
    """[rows, cols] codes 0..15 -> int32 [rows, cols / 8]; nibble i of packed column c holds
    column 8c + ORDER[i]."""
    rows, cols = intweight.shape
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= intweight[:, c * 8 + ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32))


def awq_quantize(
    w: torch.Tensor, group: int = GROUP
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoAWQ-style asymmetric RTN of a float [out, in] weight: the packed tensors and the
    float32 weight they stand for, (q - z) * s with s as stored (float16)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    hi, lo = wg.amax(-1), wg.amin(-1)
    s = ((hi - lo) / 15).clamp(min=1e-5).half().float()  # [out, G]
    z = torch.clamp(-torch.round(lo / s), 0, 15)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
    deq = ((q - z[..., None]) * s[..., None]).reshape(out_f, in_f)
    packed = {
        "qweight": awq_pack(q.reshape(out_f, in_f).t().numpy().astype(np.uint8)),
        "qzeros": awq_pack(z.t().numpy().astype(np.uint8)),
        "scales": s.t().contiguous().half(),
    }
    return packed, deq


# ---- packing on hand-made numbers -------------------------------------------------------------
def test_pack_order_by_hand():
    row = np.arange(8, dtype=np.uint8)[None]  # columns 0..7 hold their own index
    packed = awq_pack(row)
    assert packed.item() == 0x75316420  # nibbles (low first): 0 2 4 6 1 3 5 7
    assert unpack_int4_columns(packed).tolist() == [list(range(8))]
    ones = awq_pack(np.full((1, 8), 15, dtype=np.uint8))
    assert ones.item() == -1  # the sign bit is a code bit
    assert unpack_int4_columns(ones).tolist() == [[15] * 8]


def test_pack_unpack_round_trip_8x16():
    i, j = np.meshgrid(np.arange(8), np.arange(16), indexing="ij")
    codes = ((3 * i + 5 * j + i * j) % 16).astype(np.uint8)  # every code 0..15 appears
    packed = awq_pack(codes)
    assert packed.shape == (8, 2)
    assert packed.dtype == torch.int32
    assert np.array_equal(unpack_int4_columns(packed).numpy(), codes)


def test_int4_convention_matches_awq_formula():
    """(code - 8) * scale + zero with zero = (8 - z) * s equals AutoAWQ's (q - z) * s."""
    torch.manual_seed(0)
    packed, deq = awq_quantize(torch.randn(16, 64) * 0.1)
    codes, scales, zeros = awq_to_int4(packed["qweight"], packed["qzeros"], packed["scales"])
    assert codes.shape == (16, 64)
    assert scales.shape == zeros.shape == (16, 64 // GROUP)
    ours = (codes.float() - 8).reshape(16, 2, GROUP) * scales[..., None] + zeros[..., None]
    torch.testing.assert_close(ours.reshape(16, 64), deq, rtol=1e-6, atol=1e-7)
    awq_ref = dequantize_awq(packed["qweight"], packed["qzeros"], packed["scales"], GROUP)
    assert torch.equal(awq_ref, deq)


@pytest.mark.parametrize(
    ("qc", "match"),
    [
        ({"version": "gemv"}, r"version 'gemv' is not supported; accepted: \('gemm',\)"),
        ({"version": "exllama"}, r"version 'exllama'.*accepted"),
        ({"bits": 8}, r"bits=8 .*accepted: 4"),
        ({"group_size": 48}, r"group_size 48 .*accepted"),
        ({"zero_point": False}, r"zero_point"),
    ],
)
def test_unsupported_configs_are_named(qc, match):
    base = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    with pytest.raises(ValueError, match=match):
        parse_awq_config({**base, "version": "gemm", **qc})


# ---- a whole AutoAWQ folder -------------------------------------------------------------------
def write_awq_folder(src: Path, hf_model, out: Path, keep_float: tuple[str, ...] = ()) -> None:
    """An AutoAWQ GEMM folder from a saved tiny model; the transformers model gets the
    dequantized weights (and float16-rounded other tensors), becoming the float reference."""
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(keep_float) or None,
    }
    (out / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            prefix, leaf = name.rsplit(".", 1)
            quantize = leaf == "weight" and prefix.endswith(LINEARS)
            if quantize and not any(prefix.endswith(k) for k in keep_float):
                packed, deq = awq_quantize(p.data)
                tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
                p.copy_(deq)
            else:
                tensors[name] = p.data.half()
                p.copy_(tensors[name].float())
    save_file(tensors, str(out / "model.safetensors"))


@pytest.mark.parametrize(
    ("name", "keep"), [("llama_gqa", ()), ("qwen2_bias", ("layers.1.self_attn.v_proj",))]
)
def test_autoawq_folder_matches_dequantized_reference(tiny_model_factory, tmp_path, name, keep):
    import copy

    src, hf_model = tiny_model_factory(name)
    ref = copy.deepcopy(hf_model)
    folder = tmp_path / "awq"
    write_awq_folder(src, ref, folder, keep)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64)
    net = llm.engine.loaded.model
    n_layers = net.config.num_hidden_layers
    assert len(net.awq_native) == 4 * n_layers - len(keep)
    assert isinstance(net.layers[0].self_attn.qkv_proj, Int4Linear)
    assert isinstance(net.layers[0].mlp.gate_up_proj, Int4Linear)
    if keep:  # a partly quantized fused linear is dequantized to float
        assert isinstance(net.layers[1].self_attn.qkv_proj, Linear)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].float()
    got = llm.engine.prompt_logits(PROMPT)
    torch.testing.assert_close(got, want, atol=0.2, rtol=0)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def test_autoawq_gemv_folder_is_refused(tiny_model_factory, tmp_path):
    src, _ = tiny_model_factory("llama_gqa")
    folder = tmp_path / "gemv"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "version": "gemv"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"AutoAWQ version 'gemv' is not supported"):
        LLM(str(folder), dtype="float32")
