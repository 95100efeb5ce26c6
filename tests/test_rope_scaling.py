"""RoPE scaling schemes against transformers' `ROPE_INIT_FUNCTIONS` and rotary modules.

Inverse frequencies and attention scaling are compared exactly (same float32 operations).
Dynamic NTK follows lamina's per-sequence convention (see lamina/layers/rotary.py): one base
per request, from the longest the request can get; checked against transformers' no-cache
forward over a whole sequence, which uses that base for every token.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from lamina.config import ModelConfig
from lamina.layers.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq
from lamina.rope_config import RopeConfig

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

MAX_POS = 2048
PARAM_SETS = [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 4.5, "rope_theta": 1e6},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0},
    {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 3.0, "attention_factor": 0.9, "rope_theta": 1e6},
    {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5},
    {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
        "rope_theta": 500000.0,
    },
    {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 1024,
    },
]


def hf_config(params: dict, head_dim: int, max_pos: int = MAX_POS):
    params = {"rope_theta": 10000.0, **copy.deepcopy(params)}
    return transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=64,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )


def lamina_rope(params: dict, max_pos: int = MAX_POS) -> RopeConfig:
    """Ours, read from the same (unstandardized) dict a checkpoint would carry."""
    return RopeConfig.from_hf({"rope_parameters": dict(params), "max_position_embeddings": max_pos})


def model_config(rope: RopeConfig, head_dim: int, max_pos: int = MAX_POS) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=head_dim * 4,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope=rope,
    )


def _id(p: dict) -> str:
    return "-".join(f"{v}" for v in p.values())


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("params", PARAM_SETS, ids=_id)
def test_inv_freq_and_attention_scaling_equal_transformers(params, head_dim):
    cfg = hf_config(params, head_dim)
    kind = params["rope_type"]
    if kind == "default":
        ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ours, scale = rope_inv_freq(lamina_rope(params), head_dim, MAX_POS)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert scale == ref_scale


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("seq_len", [MAX_POS + 1, 3000, 4 * MAX_POS + 7])
@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_dynamic_base_at_length_equals_transformers(factor, seq_len, head_dim):
    """transformers passes seq_len as a tensor at run time (max(position_ids) + 1)."""
    params = {"rope_type": "dynamic", "factor": factor}
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](
        hf_config(params, head_dim), "cpu", seq_len=torch.tensor(seq_len)
    )
    ours, _ = rope_inv_freq(lamina_rope(params), head_dim, MAX_POS, seq_len=seq_len)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("alpha", [2, 4, 8])
def test_static_ntk_equals_transformers_dynamic_at_alpha_times_length(alpha, head_dim):
    """theta * alpha^(d/(d-2)) is transformers' dynamic rope with factor 1 at alpha * L0."""
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](
        hf_config({"rope_type": "dynamic", "factor": 1.0}, head_dim), "cpu", seq_len=alpha * MAX_POS
    )
    by_alpha, s1 = rope_inv_freq(RopeConfig(rope_type="ntk", alpha=alpha), head_dim, MAX_POS)
    by_factor, s2 = rope_inv_freq(RopeConfig(rope_type="ntk", factor=alpha), head_dim, MAX_POS)
    torch.testing.assert_close(by_alpha, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(by_factor, by_alpha, rtol=0, atol=0)
    assert s1 == s2 == 1.0
    # NTK-aware: the highest frequency is kept, the lowest is divided by alpha (like linear)
    plain, _ = rope_inv_freq(RopeConfig(), head_dim, MAX_POS)
    assert by_alpha[0] == plain[0]
    torch.testing.assert_close(by_alpha[-1], plain[-1] / alpha, rtol=1e-5, atol=0)
    # written for transformers as "default" with the scaled theta: the same frequencies
    hf = RopeConfig(rope_type="ntk", alpha=alpha).to_hf(head_dim=head_dim)
    assert hf["rope_type"] == "default"
    again, _ = rope_inv_freq(RopeConfig.from_hf({"rope_parameters": hf}), head_dim, MAX_POS)
    torch.testing.assert_close(again, by_alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("params", [p for p in PARAM_SETS if p["rope_type"] != "dynamic"], ids=_id)
def test_rotary_module_cos_sin_equal_transformers(params):
    """Whole cos/sin tables (attention scaling included) beyond the initial cache size."""
    head_dim, max_pos = 32, 64
    cfg = hf_config(params, head_dim, max_pos)
    positions = torch.arange(3 * max_pos)
    x = torch.zeros(1, 1, dtype=torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(x, positions[None])
    rot = RotaryEmbedding(model_config(lamina_rope(params, max_pos), head_dim, max_pos))
    cos, sin = rot.cos_sin(positions, torch.float32)
    # a partial rotary factor rotates the first rotary_dim features; transformers' tables
    # then cover just those
    assert rot.rotary_dim == int(head_dim * params.get("partial_rotary_factor", 1.0))
    assert cos.shape[-1] == ref_cos.shape[-1] == rot.rotary_dim
    torch.testing.assert_close(cos[:, 0], ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], ref_sin[0], rtol=0, atol=1e-6)


def _hf_rotate(rotary, q, k, position_ids):
    cos, sin = rotary(q, position_ids[None])
    # transformers' layout: [batch, heads, tokens, head_dim]
    qr, kr = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qr[0].transpose(0, 1), kr[0].transpose(0, 1)


@pytest.mark.parametrize("length", [100, 129, 400])
def test_dynamic_with_rope_len_equals_transformers_single_forward(length):
    """A sequence of `length` > L0 tokens with rope_len = length: every token's q and k are
    rotated as transformers' no-cache forward over the whole sequence rotates them, whichever
    positions a chunk covers. Without rope_lens (a sequence within L0) the trained base."""
    head_dim, max_pos = 32, 64
    params = {"rope_type": "dynamic", "factor": 4.0}
    hf_rot = LlamaRotaryEmbedding(hf_config(params, head_dim, max_pos))
    rot = RotaryEmbedding(model_config(lamina_rope(params, max_pos), head_dim, max_pos))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(length, 4, head_dim, generator=g)
    k = torch.randn(length, 2, head_dim, generator=g)
    positions = torch.arange(length)
    ref_q, ref_k = _hf_rotate(hf_rot, q, k, positions)

    lens = torch.full((length,), length)
    our_q, our_k = rot(positions, q, k, rope_lens=lens)
    torch.testing.assert_close(our_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_k, ref_k, rtol=1e-5, atol=1e-5)
    # a later chunk alone reads the same table rows: bitwise equal
    tail_q, tail_k = rot(positions[-30:], q[-30:], k[-30:], rope_lens=lens[-30:])
    assert torch.equal(tail_q, our_q[-30:])
    assert torch.equal(tail_k, our_k[-30:])
    # the trained base when no length (or one within L0) is given
    plain = rot_default(q, k, positions, head_dim)
    assert torch.equal(rot(positions, q, k)[1], plain[1])
    assert torch.equal(rot(positions, q, k, rope_lens=torch.full((length,), max_pos))[1], plain[1])


def rot_default(q, k, positions, head_dim):
    return RotaryEmbedding(model_config(RopeConfig(), head_dim, 64))(positions, q, k)


def test_dynamic_is_per_sequence_in_a_mixed_batch():
    """Three sequences (rope_len 40, 150 and 300; L0 = 64) in one flat batch give bit for bit
    what each gives alone; the one within L0 gets plain RoPE."""
    head_dim, max_pos = 32, 64
    rot = RotaryEmbedding(
        model_config(RopeConfig(rope_type="dynamic", factor=4.0), head_dim, max_pos)
    )
    g = torch.Generator().manual_seed(1)
    parts = [(torch.arange(30, 40), 40), (torch.arange(120, 150), 150), (torch.arange(5), 300)]
    positions = torch.cat([p for p, _ in parts])
    lens = torch.cat([torch.full((len(p),), n) for p, n in parts])
    q = torch.randn(len(positions), 4, head_dim, generator=g)
    k = torch.randn(len(positions), 2, head_dim, generator=g)
    both = rot(positions, q, k, rope_lens=lens)
    start = 0
    for pos, n in parts:
        sl = slice(start, start + len(pos))
        alone = rot(pos, q[sl], k[sl], rope_lens=torch.full((len(pos),), n))
        assert torch.equal(both[0][sl], alone[0])
        assert torch.equal(both[1][sl], alone[1])
        start += len(pos)
    plain = rot_default(q[:10], k[:10], parts[0][0], head_dim)
    assert torch.equal(both[0][:10], plain[0])
    # 150 and 300 use different bases
    far = rot(torch.tensor([100]), q[:1], k[:1], rope_lens=torch.tensor([150]))[0]
    farther = rot(torch.tensor([100]), q[:1], k[:1], rope_lens=torch.tensor([300]))[0]
    assert not torch.allclose(far, farther)


def test_apply_rotary_partial_leaves_the_rest():
    x = torch.randn(3, 2, 8)
    cos, sin = torch.zeros(3, 1, 4), torch.ones(3, 1, 4)
    out = apply_rotary(x, cos, sin, 4)
    assert torch.equal(out[..., 4:], x[..., 4:])


# ---- the user override ------------------------------------------------------------------------
BASE = RopeConfig(
    theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192
)


def test_from_user_accepts_json_and_dicts():
    rope = RopeConfig.from_user('{"rope_type": "dynamic", "factor": 4}', BASE)
    assert rope == RopeConfig(theta=500000.0, rope_type="dynamic", factor=4)
    yarn = RopeConfig.from_user(
        {"type": "yarn", "factor": 4.0, "beta_fast": 16, "truncate": False, "rope_theta": 1e4},
        BASE,
    )
    assert (yarn.rope_type, yarn.theta, yarn.beta_fast, yarn.truncate) == ("yarn", 1e4, 16, False)
    assert yarn.low_freq_factor == RopeConfig.low_freq_factor  # llama3 fields do not carry over
    assert yarn.original_max_position_embeddings == 8192  # the pretraining length does
    same = RopeConfig.from_user({"rope_type": "llama3", "factor": 16}, BASE)
    assert same.factor == 16
    assert same.original_max_position_embeddings == 8192
    assert RopeConfig.from_user({"rope_type": "default"}, BASE).rope_type == "default"
    ntk = RopeConfig.from_user(
        {"rope_type": "ntk", "factor": 2}, RopeConfig(rope_type="ntk", alpha=3.0)
    )
    assert ntk.alpha is None
    assert ntk.factor == 2
    # round trip through the transformers dict
    for cfg in (rope, yarn, same):
        assert RopeConfig.from_hf({"rope_parameters": cfg.to_hf()}) == cfg


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ["JSON object"]),
        ({"factor": 2}, ["rope_type", "dynamic", "yarn", "llama3", "ntk"]),
        ({"rope_type": "longrope", "factor": 2}, ["longrope", "accepted", "yarn"]),
        ({"rope_type": "dynamic", "factor": 2, "beta_fast": 3}, ["beta_fast", "factor"]),
        ({"rope_type": "linear"}, ["needs a factor"]),
        ({"rope_type": "ntk"}, ["alpha"]),
        ({"rope_type": "dynamic", "factor": 0.5}, ["factor", ">= 1"]),
        ({"rope_type": "dynamic", "factor": "4"}, ["factor", "number"]),
        ({"rope_type": "yarn", "factor": 4, "truncate": 1}, ["truncate"]),
        ({"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 2}, ["beta_fast"]),
        (
            {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 10.5},
            ["original_max_position_embeddings", "integer"],
        ),
        ({"rope_type": "llama3", "factor": 8, "high_freq_factor": 0.5}, ["high_freq_factor"]),
        ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": 2}, ["(0, 1]"]),
    ],
)
def test_from_user_rejects_bad_input_by_name(spec, words):
    with pytest.raises(ValueError, match=re.escape(words[0])) as err:
        RopeConfig.from_user(spec, BASE)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_from_hf_yarn_factor_from_lengths():
    """transformers derives a missing YaRN factor from max / original positions."""
    cfg = {
        "max_position_embeddings": 8192,
        "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 2048},
    }
    rope = RopeConfig.from_hf(json.loads(json.dumps(cfg)))
    assert rope.rope_type == "yarn"
    assert rope.factor == 4.0


# ---- end to end through the engine ------------------------------------------------------------
def _tiny_checkpoint(folder, rope_parameters: dict, max_pos: int):
    """A random 2-layer Llama with the given RoPE, saved with a byte tokenizer."""
    from tests.helpers import TINY_VOCAB, write_byte_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return model


def _ids(n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(2)).tolist()


def test_dynamic_prompt_equals_transformers_single_forward(tmp_path):
    """Beyond max_position_embeddings (32): an 80-token prompt scored alone (rope_len 80) gives
    transformers' logits from one no-cache forward over the 80 tokens, fed whole or in chunks."""
    from lamina import LLM

    hf = _tiny_checkpoint(tmp_path, {"rope_type": "dynamic", "factor": 2.0}, max_pos=32)
    ids = _ids(80)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_model_len=128)
    assert llm.engine.model_config.rope.rope_type == "dynamic"
    torch.testing.assert_close(llm.engine.prompt_logits(ids), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(llm.engine.prompt_logits(ids, chunk_size=24), ref, rtol=0, atol=1e-4)


def test_dynamic_generation_equals_transformers_on_the_final_sequence(tmp_path):
    """Greedy generation past L0 (a 40-token prompt + 30 new tokens, so rope_len 69): each token
    is the argmax of transformers' no-cache forward over the final sequence (base theta(69)),
    alone, in a batch with requests of other lengths, and with the prefix cache warm."""
    from lamina import LLM, SamplingParams

    hf = _tiny_checkpoint(tmp_path, {"rope_type": "dynamic", "factor": 2.0}, max_pos=32)
    prompt = _ids(40)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0]
    out = list(alone.outputs[0].token_ids)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1 :]
    assert ref.argmax(-1).tolist() == out
    others = [
        ({"prompt_token_ids": prompt[:20]}, SamplingParams(temperature=0, max_tokens=5)),
        ({"prompt_token_ids": prompt[:35]}, SamplingParams(temperature=0, max_tokens=60)),
        ({"prompt_token_ids": prompt}, greedy),
        ({"prompt_token_ids": prompt + out[:5]}, greedy),
    ]
    stats = llm.engine.scheduler.stats
    hits = stats.prefix_cache_hits
    batch = llm.generate([p for p, _ in others], [sp for _, sp in others], use_tqdm=False)
    assert list(batch[2].outputs[0].token_ids) == out
    assert stats.prefix_cache_hits > hits  # the same request reused the first one's blocks
    # another length means another base: no block of rope_len 69 is reused for rope_len 99
    hits = stats.prefix_cache_hits
    llm.generate([{"prompt_token_ids": prompt}], others[1][1], use_tqdm=False)
    assert stats.prefix_cache_hits == hits
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_dynamic_prefix_cache_is_salted_by_rope_len():
    from lamina.kv.block_manager import BlockManager

    bm = BlockManager(16, 4)
    tokens = list(range(12))
    table: list[int] = []
    bm.grow(table, 12)
    hashes: list[int] = []
    bm.register_full_blocks(table, hashes, tokens, 12, salt=69)
    assert bm.match_prefix(tokens, 3, salt=69)[0] == table
    assert bm.match_prefix(tokens, 3)[0] == []
    assert bm.match_prefix(tokens, 3, salt=99)[0] == []


def test_yarn_model_equals_transformers(tmp_path):
    """YaRN's attention factor (scaling cos/sin) and ramp through the whole model."""
    from lamina import LLM

    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf = _tiny_checkpoint(tmp_path, params, max_pos=64)
    ids = _ids(60)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = LLM(str(tmp_path), dtype="float32", block_size=4)
    assert llm.engine.model_config.rope.rope_type == "yarn"
    torch.testing.assert_close(llm.engine.prompt_logits(ids), ref, rtol=0, atol=1e-4)


def test_dynamic_under_streaming_llm_with_a_covering_window_equals_dense(tmp_path):
    """StreamingLLM caps rope_len at sinks + window (its positions index the cache); when that
    covers the prompt, the windowed engine scores it exactly as the dense one."""
    from lamina import LLM

    _tiny_checkpoint(tmp_path, {"rope_type": "dynamic", "factor": 2.0}, max_pos=32)
    ids = _ids(80)
    common = {"dtype": "float32", "block_size": 4, "max_model_len": 128}
    dense = LLM(str(tmp_path), **common).engine.prompt_logits(ids, chunk_size=16)
    stream = LLM(str(tmp_path), sliding_window=96, attention_sinks=4, **common)
    torch.testing.assert_close(
        stream.engine.prompt_logits(ids, chunk_size=16), dense, rtol=0, atol=1e-4
    )
