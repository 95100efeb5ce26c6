"""StreamingLLM: attention sinks + a sliding window over the paged cache."""

from __future__ import annotations

import math

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.attention.metadata import AttentionMetadata
from lamina.attention.torch_backend import TorchAttentionBackend
from lamina.config import ModelConfig
from lamina.kv.cache import KVCache
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding

PROMPT = [(7 * i) % 250 + 3 for i in range(40)]


def test_window_covering_everything_equals_dense(tiny_model_factory, assert_retention_equals_dense):
    folder, _ = tiny_model_factory("llama_gqa")
    assert_retention_equals_dense(folder, PROMPT, 7, attention_sinks=4, sliding_window=128)


def test_blocks_leaving_the_window_are_freed(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(
        str(folder),
        dtype="float32",
        block_size=8,
        attention_sinks=4,
        sliding_window=24,
        max_num_batched_tokens=16,
        max_model_len=4096,
    )
    engine = llm.engine
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=300, ignore_eos=True))
    engine.add_request("b", PROMPT[:10], SamplingParams(max_tokens=250, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_manager.num_used_blocks)
    bound = 2 * engine.policy.max_blocks_per_request(engine.scheduler_config.max_model_len, 16)
    assert peak <= bound
    # two requests of 300+ tokens (76 blocks dense) in at most 2 x (1 + 5 + 2) blocks: the sink
    # block, the 24-token window plus one 16-token step, and two of slack
    assert bound <= 2 * (1 + 5 + 2)
    engine.block_manager.check_all_free()


def test_streaming_attention_matches_naive_reference():
    """One sequence with evicted blocks: compare with attention written out by hand."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=10,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    bs, sinks, window = 4, 2, 6
    rotary = RotaryEmbedding(cfg)
    cache = KVCache(cfg, num_blocks=16, block_size=bs, dtype=torch.float32)
    layer = cache.layer(0)
    # logical tokens 0..21; blocks 0 (sink), 1-2 evicted, 3-5 live: live table = [9, 4, 7, 2]
    table = [9, 4, 7, 2]
    evicted = 2 * bs
    live_len = 22 - evicted  # 14 live tokens: 4 sink-block + 10 window-block tokens
    keys = torch.randn(live_len, 2, 8)
    values = torch.randn(live_len, 2, 8)
    slots = torch.tensor([table[c // bs] * bs + c % bs for c in range(live_len)])
    layer.write(keys, values, slots)
    # decode the token at logical 21 (cache index 13): its K/V were written above
    q = torch.randn(1, 4, 8)
    meta = AttentionMetadata.build([1], [live_len], [table], bs)
    meta.retention = StreamingWindow(sinks, window, bs, [evicted])
    out = TorchAttentionBackend().forward(q, keys[-1:], values[-1:], layer, meta, 8**-0.5, rotary)
    # reference: visible = logical < 2 or logical > 21 - 6; keys rotated at cache index
    logical = [c if c < bs else c + evicted for c in range(live_len)]
    visible = [c for c in range(live_len) if logical[c] < sinks or logical[c] > 21 - window]
    cos, sin = rotary.cos_sin(torch.arange(live_len), torch.float32)
    k_rot = keys * cos + torch.cat((-keys[..., 4:], keys[..., :4]), -1) * sin
    ref = torch.empty(4, 8)
    for h in range(4):
        kv_head = h // 2
        scores = torch.stack([q[0, h] @ k_rot[c, kv_head] for c in visible]) / math.sqrt(8)
        probs = scores.softmax(0)
        ref[h] = sum(p * values[c, kv_head] for p, c in zip(probs, visible))
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_streams_past_its_window(smollm2_path):
    llm = LLM(
        str(smollm2_path),
        attention_sinks=4,
        sliding_window=64,
        block_size=16,
        max_num_batched_tokens=64,
    )
    out = llm.generate(
        "Write a long story about a dragon.",
        SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, repetition_penalty=1.1),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) == 200
    assert len(set(out.text.split())) > 20
    llm.engine.block_manager.check_all_free()
