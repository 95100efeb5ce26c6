"""Native GGUF quants (lamina.quant.gguf_native): blocks decoded exactly, linears on the int4
kernel against `gguf.quants.dequantize` + F.linear, whole GGUF models against the float path.

Tolerances: the kernel takes bfloat16 activations, scales and zeros and returns bfloat16, so
(1) decoding is exact (atol 0); (2) a linear equals bf16(x_bf16 @ W_kernel^T) within one bf16
rounding (rtol 2^-8), with W_kernel within bf16 parameter rounding of the GGUF weight (2^-7 of
each row's largest |w|), and its output within 6e-3 relative (Frobenius) of the float32 F.linear;
(3) tiny models: logits within 0.15 of the float path (std ~1.4; measured 0.06-0.13 over 40
prompts, from bfloat16 activations, mostly into q/k/v) and 16 greedy tokens equal up to a
near-tie (see `assert_greedy_agrees`).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from lamina import LLM, SamplingParams
from lamina.layers.linear import Linear
from lamina.quant.gguf_native import SplitInt8Linear, decode_blocks, model_bytes, native_linear
from lamina.quant.int4 import Int4Linear
from tests.gguf_writer import K_QUANTS, _random_k_blocks, make_hf_model, write_gguf

DECODED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]
PROMPT = [1, 17, 99, 3, 250, 45, 45, 7, 128, 64, 5, 200, 31, 8, 77, 150, 9, 33, 12, 260, 263]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def blocks(qtype: QT, rows: int = 40, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Real GGUF blocks: quantized with gguf's own quantizer (random valid K-quant blocks)."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        return _random_k_blocks(rows, cols, qtype, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    return gguf.quants.quantize(w, qtype)


def reference(data: np.ndarray, qtype: QT, rows: int = 40) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(rows, -1).copy())


def kernel_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The float32 weight the int4 kernel computes with, read back through the kernel."""
    if isinstance(mod, SplitInt8Linear):
        w = mod.inner.dequantized()
        return w[:, : mod.in_features] + w[:, mod.in_features :]
    return mod.dequantized()


@pytest.mark.parametrize("name", DECODED)
def test_decode_is_exact(name):
    data = blocks(QT[name])
    codes = decode_blocks(data, QT[name])
    assert codes.values.dtype == np.int8
    assert codes.scales.shape == (40, 256 // 32)
    np.testing.assert_array_equal(codes.dequantize(), reference(data, QT[name]).numpy())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K"])
def test_native_linear_matches_float(name):
    qtype = QT[name]
    data = blocks(qtype, seed=1)
    mod = native_linear(decode_blocks(data, qtype), qtype, bias=True, dtype=torch.float32)
    assert isinstance(mod, SplitInt8Linear if name in ("Q8_0", "Q5_1") else Int4Linear)
    big = [t for t in [*mod.parameters(), *mod.buffers()] if t.numel() >= 40 * 256 // 2]
    assert big
    assert all(t.dtype == torch.uint8 for t in big), "a float copy of the weight is kept"
    torch.manual_seed(0)
    mod.bias.data = torch.randn(40) * 0.1
    x = torch.randn(5, 256)
    y = mod(x)

    w_ref = reference(data, qtype)
    w_kernel = kernel_weight(mod)
    row_max = w_ref.abs().amax(dim=1, keepdim=True)
    assert ((w_kernel - w_ref).abs() <= row_max * 2**-7).all()  # bf16 scale / zero rounding
    exact = F.linear(x.to(torch.bfloat16).float(), w_kernel)
    torch.testing.assert_close(y - mod.bias, exact, rtol=2**-8, atol=1e-5)
    y_ref = F.linear(x, w_ref, mod.bias)
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 6e-3


def test_q4_0_zero_is_exact():
    """Q4_0 maps to the kernel with zero = 0, and an unpadded row count stays as it is."""
    data = blocks(QT.Q4_0, rows=48)
    mod = native_linear(decode_blocks(data, QT.Q4_0), QT.Q4_0, bias=False, dtype=torch.bfloat16)
    assert mod.n_pad == 48
    assert torch.all(mod.scales_zeros[..., 1] == 0)


# ---- whole tiny GGUF models: native vs the float (dequantized) path -------------------------
@pytest.fixture(scope="module")
def models():
    return {"llama": make_hf_model("llama", seed=0), "qwen2": make_hf_model("qwen2", seed=3)}


def both(path: Path) -> tuple[LLM, LLM]:
    kw = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    return LLM(str(path), **kw), LLM(str(path), quantization="gguf", **kw)


def greedy(llm: LLM, prompt: list[int]) -> list[int]:
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    return out.outputs[0].token_ids


def assert_greedy_agrees(ref: LLM, nat: LLM, prompt: list[int], atol: float) -> None:
    """16 greedy tokens equal, except that the two runs may part at a near-tie of the float
    model: two tokens whose float logits are closer than 2 * atol (the logits tolerance), where
    bfloat16 activations may legitimately pick the other one; after that they are not compared.

    Random tiny models have flat logits (top-2 gaps under 0.02 occur in most 16-token runs, as
    small as the bfloat16 noise), so exact equality would be a coin flip on another CPU."""
    want, got = greedy(ref, prompt), greedy(nat, prompt)
    assert len(set(want)) > 1, "degenerate model: greedy repeats one token"
    n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
    if n < len(want):
        logits = ref.engine.prompt_logits(prompt + want[:n])[-1]
        gap = (logits[want[n]] - logits[got[n]]).item()
        assert gap < 2 * atol, f"greedy parts at step {n} with a float logit gap of {gap:.3f}"


@pytest.mark.parametrize(
    ("arch", "name"), [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q8_0")]
)
def test_tiny_model_native_matches_float_path(tmp_path, models, arch, name):
    path = tmp_path / f"{arch}-{name}.gguf"
    write_gguf(models[arch], path, QT[name])
    ref, nat = both(path)
    net = nat.engine.loaded.model
    assert len(net.gguf_native) == 4 * net.config.num_hidden_layers
    assert set(net.gguf_native.values()) == {name}
    want = ref.engine.prompt_logits(PROMPT)
    got = nat.engine.prompt_logits(PROMPT)
    torch.testing.assert_close(got, want, atol=0.15, rtol=0)
    assert_greedy_agrees(ref, nat, PROMPT, atol=0.15)
    assert model_bytes(net) < 0.5 * model_bytes(ref.engine.loaded.model)


def test_mixed_types_fall_back_to_float(tmp_path, models):
    """attn_v in Q6_K beside Q4_0 q/k: that layer's fused qkv is dequantized, the rest native."""
    path = tmp_path / "mixed.gguf"
    write_gguf(models["llama"], path, QT.Q4_0, type_overrides={"blk.0.attn_v.weight": QT.Q6_K})
    ref, nat = both(path)
    net = nat.engine.loaded.model
    assert isinstance(net.layers[0].self_attn.qkv_proj, Linear)
    assert isinstance(net.layers[1].self_attn.qkv_proj, Int4Linear)
    assert "layers.0.self_attn.qkv_proj" not in net.gguf_native
    assert len(net.gguf_native) == 7
    got, want = nat.engine.prompt_logits(PROMPT), ref.engine.prompt_logits(PROMPT)
    torch.testing.assert_close(got, want, atol=0.15, rtol=0)


def test_bad_quantization_argument(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization 'q4'.*accepted"):
        LLM(str(tmp_path), quantization="q4")
    with pytest.raises(ValueError, match=r"needs a \.gguf file"):
        LLM(str(tmp_path), quantization="gguf")


# ---- SmolLM2 (its GGUF is Q4_1 with a Q8_0 embedding) ----------------------------------------
@pytest.mark.slow
def test_smollm2_q4_1_native(smollm2_path, smollm2_llm):
    nat = LLM(str(smollm2_path), dtype="float32", max_model_len=1024, quantization="gguf")
    net = nat.engine.loaded.model
    assert set(net.gguf_native.values()) == {"Q4_1"}
    assert len(net.gguf_native) == 4 * 30
    ids = nat.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    got, want = nat.engine.prompt_logits(ids), smollm2_llm.engine.prompt_logits(ids)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got - want).abs().max() < 1.5  # logits span about -20 .. 25
    assert_greedy_agrees(smollm2_llm, nat, ids, atol=0.75)
    # decoder layers: float32 424 MB; native int4 linears ~66 MB. Both pack the tied head
    # (113 MB); the float model keeps its dense embedding (113 MB) for lookups, the native one
    # the file's Q8_0 rows (30 MB)
    assert model_bytes(net.layers) < 0.2 * model_bytes(smollm2_llm.engine.loaded.model.layers)
    assert model_bytes(net) < 0.35 * model_bytes(smollm2_llm.engine.loaded.model)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_tied_quantized_embedding_is_looked_up_from_its_gguf_rows(tmp_path, name):
    """A tied model run natively keeps its token_embd as the file's quantized rows once the LM
    head is packed: lookups give exactly the dense table's rows, and the dense table goes."""
    from lamina.quant.gguf_native import GGUFRowTable

    path = tmp_path / "tied.gguf"
    write_gguf(make_hf_model("llama", seed=1, tie_word_embeddings=True), path, QT[name])
    kw = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64, "quantization": "gguf"}
    nat, dense = LLM(str(path), **kw), LLM(str(path), pack_weights=False, **kw)
    net, ref = nat.engine.loaded.model, dense.engine.loaded.model
    assert isinstance(net.embed_lookup, GGUFRowTable)
    assert net.embed_tokens.numel() == 0
    assert ref.embed_lookup is None
    assert ref.embed_tokens.numel() > 0
    ids = torch.tensor([[3, 7], [200, 3]])
    assert torch.equal(net.embed(ids), ref.embed_tokens[ids])
    assert model_bytes(net) < model_bytes(ref) + 0.5 * ref.embed_tokens.numel() * 4
    got, want = nat.engine.prompt_logits(PROMPT), dense.engine.prompt_logits(PROMPT)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    net.unpack_weights()  # the dense table comes back from the packed head
    assert torch.equal(net.embed_tokens, ref.embed_tokens)
    torch.testing.assert_close(nat.engine.prompt_logits(PROMPT), want, atol=1e-4, rtol=1e-4)


def test_untied_quantized_embedding_needs_no_dense_table(tmp_path):
    """Untied, the embedding only serves lookups: native mode keeps just the file's rows."""
    path = tmp_path / "untied.gguf"
    write_gguf(make_hf_model("llama", seed=2), path, QT.Q8_0)
    kw = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 64}
    nat = LLM(str(path), quantization="gguf", **kw)
    ref = LLM(str(path), **kw)
    net = nat.engine.loaded.model
    assert net.lm_head is not None
    assert net.embed_tokens.numel() == 0
    ids = torch.tensor([5, 9, 200])
    assert torch.equal(net.embed(ids), ref.engine.loaded.model.embed_tokens[ids])
    plain = LLM(str(path), quantization="gguf", pack_weights=False, **kw)  # rows still used
    torch.testing.assert_close(
        plain.engine.prompt_logits(PROMPT), nat.engine.prompt_logits(PROMPT), atol=1e-4, rtol=1e-4
    )
