"""oneDNN-packed linears (lamina/layers/linear.py): same numbers as F.linear up to summation
order, bitwise independent of the batch, reversible, and used by the engine by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamina import LLM, SamplingParams
from lamina.layers.linear import Linear, can_pack

pytestmark = pytest.mark.skipif(
    not can_pack(torch.empty(1)), reason="this torch build has no oneDNN CPU GEMM"
)


def _linear(dtype: torch.dtype, bias: bool) -> Linear:
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 160, bias, dtype)
    lin.weight.data = torch.randn(160, 96, generator=g).to(dtype)
    if bias:
        lin.bias.data = torch.randn(160, generator=g).to(dtype)
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear_and_is_batch_invariant(dtype, bias):
    if dtype == torch.bfloat16 and not can_pack(torch.empty(1, dtype=dtype)):
        pytest.skip("no bf16 oneDNN GEMM on this CPU")
    lin = _linear(dtype, bias)
    weight = lin.weight.detach().clone()
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = F.linear(x.double(), weight.double(), None if lin.bias is None else lin.bias.double())
    assert lin.pack()
    assert lin.weight.numel() == 0
    assert "packed" in repr(lin)
    out = lin(x)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # a row's result does not depend on how many rows share the GEMM: bitwise on the Zen 4 CPUs
    # this was measured on (PEERS.md); oneDNN may pick per-size kernels on other ISAs, so the
    # check allows a rounding step
    for rows in (slice(0, 1), slice(3, 11), slice(20, 37)):
        torch.testing.assert_close(lin(x[rows]), out[rows], rtol=tol / 10, atol=tol / 10)
    assert torch.equal(lin.dense_weight(), weight)
    lin.unpack()
    assert lin.packed is None
    assert torch.equal(lin.weight, weight)
    torch.testing.assert_close(lin(x).double(), ref, atol=tol, rtol=tol)


def test_unsupported_dtype_stays_row_major():
    lin = _linear(torch.float16, False)
    assert not lin.pack()
    assert lin.packed is None
    assert lin.weight.shape == (160, 96)


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "qwen2_bias"])
def test_engine_packs_by_default_and_matches_the_row_major_model(tiny_model_factory, name):
    folder, _ = tiny_model_factory(name)
    common = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    packed, plain = LLM(str(folder), **common), LLM(str(folder), pack_weights=False, **common)
    net = packed.engine.loaded.model
    layer = net.layers[0]
    assert layer.self_attn.qkv_proj.packed is not None
    assert layer.mlp.down_proj.packed is not None
    assert net.packed_lm_head is not None
    assert plain.engine.loaded.model.layers[0].mlp.down_proj.packed is None
    prompt = list(range(5, 40))
    torch.testing.assert_close(
        packed.engine.prompt_logits(prompt),
        plain.engine.prompt_logits(prompt),
        atol=1e-4,
        rtol=1e-4,
    )
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    a = packed.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0]
    b = plain.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    # unpacking gives the loaded weights back, and the same model still runs
    net.unpack_weights()
    reference = plain.engine.loaded.model
    assert torch.equal(layer.mlp.down_proj.weight, reference.layers[0].mlp.down_proj.weight)
    assert torch.equal(net.lm_head_weight, reference.lm_head_weight)
    c = packed.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0]
    assert c.outputs[0].token_ids == b.outputs[0].token_ids


def test_quantize_and_prune_work_on_an_engine_packed_model(tiny_model_factory):
    """Both read and rewrite `Linear.weight`: they unpack first and pack what is left after."""
    from lamina.prune import prune_model
    from lamina.prune.magnitude import sparsity_of
    from lamina.quant import quantize_model

    folder, _ = tiny_model_factory("llama_gqa")
    common = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    prompt = list(range(5, 40))
    ref = LLM(str(folder), pack_weights=False, **common)
    quantize_model(ref.engine.loaded.model, "int8", progress=False)
    llm = LLM(str(folder), **common)
    quantize_model(llm.engine.loaded.model, "int8", progress=False)
    assert llm.engine.loaded.model.packed_lm_head is not None  # untied head packed again
    torch.testing.assert_close(
        llm.engine.prompt_logits(prompt), ref.engine.prompt_logits(prompt), atol=1e-4, rtol=1e-4
    )
    pruned = LLM(str(folder), **common)
    prune_model(pruned.engine.loaded.model, "magnitude", sparsity=0.5, progress=False)
    net = pruned.engine.loaded.model
    assert net.layers[0].mlp.down_proj.packed is not None
    assert abs(sparsity_of(net) - 0.5) < 1e-3


def test_save_quantized_from_an_engine_packed_model(tiny_model_factory, tmp_path):
    """save_quantized reads the LM head and norms: it unpacks first, so the checkpoint is whole."""
    from lamina.quant import quantize_model
    from lamina.quant.checkpoint import save_quantized

    folder, _ = tiny_model_factory("llama_gqa")  # untied: the packed head replaced lm_head
    common = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    llm = LLM(str(folder), **common)
    loaded = llm.engine.loaded
    quantize_model(loaded.model, "int8", progress=False)
    out = save_quantized(loaded.model, loaded.config, loaded.tokenizer, tmp_path / "q")
    assert loaded.model.packed_lm_head is not None  # packed again afterwards
    again = LLM(str(out), **common)
    prompt = list(range(5, 40))
    torch.testing.assert_close(
        again.engine.prompt_logits(prompt), llm.engine.prompt_logits(prompt), atol=1e-4, rtol=1e-4
    )
