"""The decoder-linear layout (lamina/models/layout.py) and the loading built on it, model-free or
on a tiny random model built in memory: no transformers, no files."""

from __future__ import annotations

import pytest
import torch

from lamina.config import ModelConfig
from lamina.formats.gguf import gguf_name, hf_name
from lamina.models.layout import PackedModule, WeightLayout
from lamina.models.llama import DECODER_LINEARS, LlamaForCausalLM

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def tiny_config(kind: str = "gqa", **switches) -> ModelConfig:
    heads, kv_heads = HEADS[kind]
    return ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=6,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        **switches,
    )


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_split_inverts_fuse_and_rows_match_the_config(kind):
    c = tiny_config(kind)
    layout = WeightLayout(c, DECODER_LINEARS)
    assert layout.shard_sizes("self_attn.qkv_proj") == [c.q_size, c.kv_size, c.kv_size]
    assert layout.shard_sizes("mlp.gate_up_proj") == [c.intermediate_size] * 2
    assert layout.shard_sizes("self_attn.o_proj") == [c.hidden_size]
    assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= set(layout.fused_names)
    for fused in layout.fused_names:
        parts = [torch.randn(n, 7) for n in layout.shard_sizes(fused)]
        fused_t = layout.fuse(fused, parts)
        assert fused_t.shape[0] == sum(layout.shard_sizes(fused))
        back = layout.split(fused, fused_t)
        assert len(back) == len(parts) == len(layout.checkpoint_parts(fused))
        assert all(torch.equal(a, b) for a, b in zip(parts, back))


def test_slots_locate_each_part_rows():
    c = tiny_config("gqa")
    layout = WeightLayout(c, DECODER_LINEARS)
    assert layout.slot("self_attn.q_proj") == ("self_attn.qkv_proj", 0, c.q_size)
    v_start = c.q_size + c.kv_size
    assert layout.slot("self_attn.v_proj") == ("self_attn.qkv_proj", v_start, c.kv_size)
    inter = c.intermediate_size
    assert layout.slot("mlp.up_proj") == ("mlp.gate_up_proj", inter, inter)
    assert layout.slot("self_attn.o_proj") == ("self_attn.o_proj", 0, c.hidden_size)
    assert layout.slot("input_layernorm") is None


def test_mismatches_are_named():
    layout = WeightLayout(tiny_config("gqa"), DECODER_LINEARS)
    with pytest.raises(ValueError, match="qkv_proj"):
        layout.split("self_attn.qkv_proj", torch.zeros(5, 3))
    with pytest.raises(ValueError, match="gate_up_proj"):
        layout.fuse("mlp.gate_up_proj", [torch.zeros(40, 3), torch.zeros(39, 3)])
    with pytest.raises(KeyError, match="not a decoder linear"):
        layout.module("mlp.act")
    with pytest.raises(ValueError, match="pair up"):
        PackedModule("x", ("a", "b"), ("hidden_size",))


def test_gguf_names_follow_the_declared_parts():
    parts = [part for m in DECODER_LINEARS for part in m.parts]
    assert len(parts) == 7  # q, k, v, o, gate, up, down
    for part in parts:
        for kind in ("weight", "bias"):
            assert hf_name(gguf_name(3, part, kind)) == f"model.layers.3.{part}.{kind}"


def random_checkpoint(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Random tensors under every name the model expects, shaped from the layout alone."""
    c, layout = model.config, model.layout
    out = {}
    for name in model.expected_weights():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape: tuple[int, ...] = (c.vocab_size, c.hidden_size)
        elif "layernorm" in name or name == "model.norm.weight":
            shape = (c.hidden_size,)
        else:
            path, kind = name.split(".", 3)[3].rsplit(".", 1)
            slot = layout.slot(path)
            assert slot is not None
            in_features = model.layers[0].get_submodule(slot.fused).in_features
            shape = (slot.size, in_features) if kind == "weight" else (slot.size,)
        out[name] = torch.randn(shape)
    return out


@pytest.mark.parametrize("switches", [{}, {"attention_bias": True, "mlp_bias": True}])
def test_load_weights_fills_fused_rows_and_checkpoint_weights_inverts_it(switches):
    model = LlamaForCausalLM(tiny_config("gqa", **switches))
    ckpt = random_checkpoint(model)
    model.load_weights(ckpt.items())
    layer = model.layers[1]
    qkv = [ckpt[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(qkv))
    if switches:  # every bias a linear holds is read, mlp ones included
        up = ckpt["model.layers.1.mlp.up_proj.bias"]
        assert torch.equal(layer.mlp.gate_up_proj.bias[model.config.intermediate_size :], up)
    back = dict(model.checkpoint_weights())
    assert back.keys() == ckpt.keys()
    assert all(torch.equal(back[k], v) for k, v in ckpt.items())


def test_prefilled_names_are_neither_required_nor_read():
    model = LlamaForCausalLM(tiny_config("mha"))
    ckpt = random_checkpoint(model)
    held = {n for n in ckpt if ".mlp.gate_proj." in n or ".mlp.up_proj." in n}
    with pytest.raises(ValueError, match="missing"):
        model.load_weights((k, v) for k, v in ckpt.items() if k not in held)
    weight = model.layers[0].mlp.gate_up_proj.weight
    weight.fill_(7.0)  # a known value (parameters start uninitialised: maybe NaN)
    model.load_weights(ckpt.items(), prefilled=held)  # held tensors present: still not read
    assert bool((weight == 7.0).all())
