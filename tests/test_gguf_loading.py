"""GGUF loading: tiny models written by tests/gguf_writer.py (llama.cpp's conversion), loaded by
lamina and by transformers (the oracle).

transformers' GGUF loader dequantizes every type used here with the same `gguf` package
(F32 ... Q6_K), so it is the reference for all of them. Each case also checks lamina's loaded
weights against the writer's own dequantization (permutation undone), independently of
transformers' reverse-permutation code.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from lamina import LLM, SamplingParams
from tests.gguf_writer import VOCAB_SIZE, make_hf_model, permute_qk, write_gguf

PROMPT = [1, 17, 99, 3, 250, 45, 45, 7, 128, 64, 5, 200, 31, 8, 77, 150, 9, 33, 12, 260, 263]
N_GREEDY = 16
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def written(gguf_dir):
    """(model name, type name) -> (GGUF path, HF model, expected HF-named float32 weights).

    Models: "llama" (GQA 4/2, untied), "qwen2" (q/k/v bias, tied, non-default rope theta and
    eps), "llama_mha" / "llama_mqa" (4/4 and 4/1 heads, for the permutation round trip).
    """
    models: dict[str, torch.nn.Module] = {}
    files: dict[tuple[str, str], tuple[Path, torch.nn.Module, dict[str, np.ndarray]]] = {}
    specs = {
        "llama": {"arch": "llama", "seed": 0},
        "llama_mha": {"arch": "llama", "seed": 1, "num_key_value_heads": 4},
        "llama_mqa": {"arch": "llama", "seed": 2, "num_key_value_heads": 1},
        "qwen2": {
            "arch": "qwen2",
            "seed": 3,
            "tie_word_embeddings": True,
            "rope_theta": 50000.0,
            "rms_norm_eps": 1e-5,
        },
    }

    def get(model_name: str, qtype: str):
        key = (model_name, qtype)
        if key not in files:
            if model_name not in models:
                models[model_name] = make_hf_model(**specs[model_name])
            model = models[model_name]
            path = gguf_dir / f"{model_name}-{qtype}.gguf"
            files[key] = (path, model, write_gguf(model, path, QT[qtype]))
        return files[key]

    return get


def load_lamina(path: Path) -> LLM:
    return LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64)


def lamina_weights(llm: LLM) -> dict[str, torch.Tensor]:
    """lamina's parameters under Hugging Face names (fused q/k/v and gate/up split apart)."""
    net = llm.engine.loaded.model
    net.unpack_weights()  # the engine packs them for oneDNN
    c = net.config
    out = {"model.embed_tokens.weight": net.embed_tokens, "model.norm.weight": net.norm.weight}
    if net.lm_head is not None:
        out["lm_head.weight"] = net.lm_head
    for i, layer in enumerate(net.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        sizes = [c.q_size, c.kv_size, c.kv_size]
        for proj, w in zip(("q", "k", "v"), attn.qkv_proj.weight.split(sizes)):
            out[p + f"self_attn.{proj}_proj.weight"] = w
        if attn.qkv_proj.bias is not None:
            for proj, b in zip(("q", "k", "v"), attn.qkv_proj.bias.split(sizes)):
                out[p + f"self_attn.{proj}_proj.bias"] = b
        out[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
        gate, up = mlp.gate_up_proj.weight.split([c.intermediate_size] * 2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = mlp.down_proj.weight
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return out


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Independent greedy reference: a full forward each step, no cache."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def assert_matches_transformers(path: Path) -> LLM:
    import transformers

    llm = load_lamina(path)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].float()
    ours = llm.engine.prompt_logits(PROMPT)
    assert ours.shape == (len(PROMPT), VOCAB_SIZE)
    assert torch.isfinite(ref).all()
    # rtol: lamina's oneDNN-packed float32 GEMMs sum in another order than transformers'
    torch.testing.assert_close(ours[-1], ref[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    expected = hf_greedy(ref_model, PROMPT, N_GREEDY)
    out = llm.generate(
        {"prompt_token_ids": PROMPT},
        SamplingParams(temperature=0, max_tokens=N_GREEDY, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].token_ids == expected
    assert len(set(expected)) > 1, "degenerate model: greedy repeats one token"
    return llm


def assert_weights_equal(llm: LLM, expected: dict[str, np.ndarray]) -> None:
    ours = lamina_weights(llm)
    assert set(ours) == set(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(ours[name], torch.from_numpy(ref), atol=0, rtol=0, msg=name)


# ---- 1. every supported tensor type, llama (GQA, untied output) ---------------------------
@pytest.mark.parametrize("qtype", TYPES)
def test_llama_type_matches_transformers(written, qtype):
    path, _, expected = written("llama", qtype)
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t.tensor_type for t in reader.tensors}
    assert stored["blk.0.attn_q.weight"] == QT[qtype]
    assert stored["token_embd.weight"] == QT[qtype]
    assert stored["output.weight"] == QT[qtype]
    assert stored["blk.1.ffn_norm.weight"] == QT.F32
    llm = assert_matches_transformers(path)
    assert not llm.engine.loaded.config.tie_word_embeddings
    assert_weights_equal(llm, expected)


# ---- 2. qwen2: q/k/v bias, tied embeddings, no permutation ---------------------------------
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_qwen2_matches_transformers(written, qtype):
    path, model, expected = written("qwen2", qtype)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names
    assert "blk.0.attn_q.bias" in names
    assert reader.fields["qwen2.rope.freq_base"].contents() == 50000.0
    llm = assert_matches_transformers(path)
    cfg = llm.engine.loaded.config
    assert cfg.tie_word_embeddings
    assert cfg.attention_bias
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.rope.theta == 50000.0
    assert llm.engine.loaded.model.lm_head is None
    assert_weights_equal(llm, expected)
    if qtype == "F32":  # qwen2 rows are stored as they are: exactly the HF weights
        ours = lamina_weights(llm)
        for name, p in model.state_dict().items():
            if name != "lm_head.weight":
                assert torch.equal(ours[name], p), name


# ---- 3. q/k permutation round trip -----------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "llama_mha", "llama_mqa"])
def test_qk_permutation_round_trip(written, model_name):
    path, model, _ = written(model_name, "F32")
    sd = model.state_dict()
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    # the file really holds llama.cpp's permuted rows, not the HF ones
    data = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    q_hf = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    k_hf = sd["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(data["blk.0.attn_q.weight"], q_hf)
    np.testing.assert_array_equal(data["blk.0.attn_q.weight"], permute_qk(q_hf, heads))
    np.testing.assert_array_equal(data["blk.0.attn_k.weight"], permute_qk(k_hf, kv_heads))

    llm = load_lamina(path)
    net = llm.engine.loaded.model
    net.unpack_weights()
    c = net.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (heads, kv_heads)
    for i, layer in enumerate(net.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split([c.q_size, c.kv_size, c.kv_size])
        p = f"model.layers.{i}.self_attn."
        assert torch.equal(q, sd[p + "q_proj.weight"])
        assert torch.equal(k, sd[p + "k_proj.weight"])
        assert torch.equal(v, sd[p + "v_proj.weight"])
    ours = lamina_weights(llm)
    for name, p in sd.items():
        assert torch.equal(ours[name], p), name


# ---- 4. errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad_type", ["TQ1_0", "IQ2_XXS"])
def test_unsupported_tensor_type_is_named(written, gguf_dir, bad_type):
    _, model, _ = written("llama", "F32")
    path = gguf_dir / f"bad-type-{bad_type}.gguf"
    write_gguf(model, path, QT.F32, type_overrides={"blk.1.attn_v.weight": QT[bad_type]})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_v\.weight") as err:
        load_lamina(path)
    msg = str(err.value)
    assert bad_type in msg
    assert "accepted" in msg
    assert all(t in msg for t in ("F32", "Q8_0", "Q4_K", "Q6_K"))


def test_q8_k_is_refused_by_name(written, gguf_dir):
    _, model, _ = written("llama", "F32")
    path = gguf_dir / "bad-type-Q8_K.gguf"
    write_gguf(model, path, QT.F32, type_overrides={"blk.0.attn_v.weight": QT.Q8_K})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight.*Q8_K"):
        load_lamina(path)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_architecture_is_named(written, gguf_dir, arch):
    _, model, _ = written("llama", "F32")
    path = gguf_dir / f"bad-arch-{arch}.gguf"
    write_gguf(model, path, QT.F32, architecture=arch)
    with pytest.raises(ValueError, match=repr(arch)) as err:
        load_lamina(path)
    msg = str(err.value)
    assert "architecture" in msg
    assert all(a in msg for a in ("llama", "qwen2"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"noise\.gguf is not a readable GGUF file"):
        load_lamina(path)
