"""Quantizing whole models: scale folding, quantize_model, checkpoints, loading, the CLI.

The tiny random checkpoints amplify each linear's error about 5x by the logits (random
weights of std 0.2 over 2 layers), so logit tolerances here are ~6x the per-linear error of
each method (int8 ~0.8%, W8A8 ~1%, int4 g32 ~8%). Quality on a real model is the slow SmolLM2
perplexity test at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.commands.quantize import add_quantize_parser, cmd_quantize
from lamina.loading.loader import load_model
from lamina.quant import (
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    quant_config_of,
    quantize_model,
    save_quantized,
)
from lamina.quant.calibrate import collect_stats, forward_logits
from lamina.quant.checkpoint import quantized_state
from lamina.quant.fold import apply_scale, scale_groups


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = ids(48, 0)
CALIB = [ids(96, s) for s in (1, 2, 3)]
KINDS = {"int8": Int8Linear, "rtn4": Int4Linear, "awq": Int4Linear, "smoothquant": W8A8Linear}
LOGIT_TOL = {"int8": 0.06, "smoothquant": 0.08, "rtn4": 0.55, "awq": 0.55}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on 2 shared cores, OpenMP's second thread mostly waits (10-100x slower
    under load); one thread keeps these tests fast and their timing stable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def float_logits(tiny_model_factory):
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            folder, _ = tiny_model_factory(name)
            cache[name] = forward_logits(load_model(folder, "float32").model, PROMPT)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa", "qwen2_bias"])
def test_folding_scales_keeps_the_float_model(tiny_model_factory, float_logits, name):
    folder, _ = tiny_model_factory(name)
    model = load_model(folder, "float32").model
    groups = scale_groups(model)
    assert groups  # else the model is trivially unchanged
    has_o = any(g.name.endswith("o_proj") for g in groups)
    assert has_o == (name == "llama_mha")  # o_proj folds into v only without GQA
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        apply_scale(g, torch.rand(g.linear.in_features, generator=gen) * 4 + 0.25)
    torch.testing.assert_close(
        forward_logits(model, PROMPT), float_logits(name), rtol=1e-4, atol=1e-4
    )


def test_calibration_stats(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    stats = collect_stats(load_model(folder, "float32").model, CALIB, max_rows=50, progress=False)
    assert len(stats) == 2 * 4
    st = stats["layers.1.mlp.down_proj"]
    assert st.count == 288
    assert st.absmax.shape == (128,)
    assert 40 <= st.samples.shape[0] <= 60
    assert torch.all(st.absmean <= st.absmax)


@pytest.mark.parametrize("method", ["int8", "rtn4", "awq", "smoothquant"])
def test_quantized_logits_close_and_reload_bit_identical(
    tiny_model_factory, float_logits, tmp_path, method
):
    name = "qwen2_bias" if method == "awq" else "llama_gqa"  # awq on q/k/v biases too
    folder, _ = tiny_model_factory(name)
    loaded = load_model(folder, "float32")
    cfg = quantize_model(loaded.model, method, CALIB, group_size=32, progress=False)
    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, KINDS[method])
    assert isinstance(layer.mlp.down_proj, KINDS[method])
    logits = forward_logits(loaded.model, PROMPT)
    assert rel(logits, float_logits(name)) < LOGIT_TOL[method]

    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, tmp_path / "q")
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "lamina"
    assert block["method"] == method
    assert block["bits"] == (4 if method in ("rtn4", "awq") else 8)
    assert block["group_size"] == (32 if method in ("rtn4", "awq") else None)
    assert quant_config_of(out) == cfg

    again = load_model(out, "float32")
    a, b = quantized_state(loaded.model), quantized_state(again.model)
    assert a
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(forward_logits(again.model, PROMPT), logits)


@pytest.mark.parametrize("method", ["int8", "awq"])
def test_bfloat16_model_quantizes_and_reloads(tiny_model_factory, float_logits, tmp_path, method):
    folder, _ = tiny_model_factory("qwen2_bias")
    loaded = load_model(folder, "bfloat16")
    quantize_model(loaded.model, method, CALIB, group_size=32, progress=False)
    logits = forward_logits(loaded.model, PROMPT)
    assert rel(logits, float_logits("qwen2_bias")) < LOGIT_TOL[method]
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, tmp_path / "q")
    again = load_model(out, "bfloat16")
    assert again.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    a, b = quantized_state(loaded.model), quantized_state(again.model)
    assert a
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(forward_logits(again.model, PROMPT), logits)


def test_awq_beats_rtn_on_a_model_with_outlier_channels(tiny_model_factory, tmp_path):
    """Plant activation outliers without changing the float model (norm weight x30 on four
    channels, the matching weight columns / 30); RTN then loses those small columns."""
    folder, _ = tiny_model_factory("llama_gqa")

    def planted():
        model = load_model(folder, "float32").model
        s = torch.ones(64)
        s[:4] = 1 / 30
        for g in scale_groups(model, o_proj=False, down_proj=False):
            apply_scale(g, s)
        return model

    ref = forward_logits(planted(), PROMPT)
    errors = {}
    for method in ("rtn4", "awq"):
        model = planted()
        quantize_model(model, method, CALIB, group_size=32, progress=False)
        errors[method] = rel(forward_logits(model, PROMPT), ref)
    assert errors["awq"] < 0.8 * errors["rtn4"]


def test_quantized_checkpoint_runs_in_the_engine(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("llama_gqa")
    loaded = load_model(folder, "float32")
    quantize_model(loaded.model, "rtn4", group_size=32, progress=False)
    expected = forward_logits(loaded.model, PROMPT)[-1].argmax().item()
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, tmp_path / "q")
    llm = LLM(str(out), max_model_len=128, kv_cache_bytes=1 << 22)
    res = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert res[0].outputs[0].token_ids[0] == expected


def test_bad_requests_raise(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("llama_gqa")
    model = load_model(folder, "float32").model
    with pytest.raises(ValueError, match="calib"):
        quantize_model(model, "awq", None)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, "rtn4", group_size=48)
    quantize_model(model, "int8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


def test_missing_tensor_is_named(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_model_factory("llama_gqa")
    loaded = load_model(folder, "float32")
    quantize_model(loaded.model, "int8", progress=False)
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, tmp_path / "q")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["layers.1.mlp.down_proj.scales"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.scales"):
        load_model(out, "float32")


def test_cli_quantize(tiny_model_factory, tmp_path):
    folder, _ = tiny_model_factory("llama_mha")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_quantize_parser(parser.add_subparsers())
    out = tmp_path / "awq"
    args = parser.parse_args(
        ["quantize", "--method", "awq", "--model", str(folder), "--calib", str(calib),
         "--out", str(out), "--group-size", "32", "--num-calib-tokens", "300", "--seq-len", "100"]
    )  # fmt: skip
    assert args.func(args) == 0
    cfg = quant_config_of(out)
    assert cfg is not None
    assert cfg.method == "awq"
    assert cfg.options["calib_tokens"] == 300
    assert isinstance(load_model(out, "float32").model.layers[0].self_attn.o_proj, Int4Linear)
    missing = parser.parse_args(["quantize", "--method", "smoothquant", "--out", str(out)])
    with pytest.raises(SystemExit, match="--calib"):
        cmd_quantize(missing)


# ---- SmolLM2 (slow) -------------------------------------------------------------------------
EVAL_TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this."
)


def _ppl(model, token_ids: list[int]) -> float:
    logp = torch.log_softmax(forward_logits(model, token_ids)[:-1], dim=-1)
    nll = -logp.gather(1, torch.tensor(token_ids[1:])[:, None]).mean()
    return float(torch.exp(nll))


@pytest.mark.slow
def test_smollm2_quantized_perplexity(smollm2_path):
    """Perplexity of SmolLM2-135M on a short text, float vs each method.

    The default GGUF is Q4_1 (4-bit groups of 32, asymmetric), so its dequantized weights sit on
    a grid rtn4 with group size 32 reproduces almost exactly; groups of 128 are the real test.
    Measured here: float 12.99, int8 13.02, smoothquant 13.24, rtn4 g128 33.9, awq g128 20.7.
    """
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    base = load_model(smollm2_path, "float32")
    calib = [base.tokenizer.encode(readme)[:512]]
    text = base.tokenizer.encode(EVAL_TEXT)
    ppl = {"float": _ppl(base.model, text)}
    del base
    for method in ("int8", "smoothquant", "rtn4", "awq"):
        model = load_model(smollm2_path, "float32").model
        quantize_model(
            model, method, calib, group_size=128, max_calib_rows=128, clip=False, progress=False
        )
        ppl[method] = _ppl(model, text)
    print(ppl)
    assert ppl["int8"] < ppl["float"] * 1.02
    assert ppl["smoothquant"] < ppl["float"] * 1.05
    assert ppl["awq"] < ppl["rtn4"] * 0.85
