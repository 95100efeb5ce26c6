"""int8 KV cache: per-token-per-head scales; close to float, about 4x the tokens per byte."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.config import CacheConfig
from lamina.kv.cache import num_blocks_for, quantize_int8


def test_quantize_int8_round_trip_error():
    torch.manual_seed(0)
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8
    assert scale.shape == (50, 3)
    err = (q.float() * scale.unsqueeze(-1) - x).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-6).all())  # half a step at most


def test_int8_holds_more_than_twice_the_tokens(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", max_model_len=64)
    cfg = llm.engine.model_config
    budget = 64 * 1024 * 1024
    fp32 = num_blocks_for(cfg, CacheConfig(kv_cache_bytes=budget), torch.float32)
    int8 = num_blocks_for(
        cfg, CacheConfig(kv_cache_bytes=budget, kv_cache_dtype="int8"), torch.float32
    )
    assert int8 / fp32 >= 1.9  # head_dim 32: (4 * 32) / (32 + 4) = 3.6x


def test_int8_generation_close_to_float(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    prompts = [[5, 9, 17, 3] * 5, list(range(10, 60))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs = {}
    for kv in ("auto", "int8"):
        llm = LLM(str(folder), dtype="float32", kv_cache_dtype=kv, max_num_batched_tokens=16)
        runs[kv] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.block_manager.check_all_free()
    for f, q in zip(runs["auto"], runs["int8"]):
        fo, qo = f.outputs[0], q.outputs[0]
        same = next(
            (i for i, (a, b) in enumerate(zip(fo.token_ids, qo.token_ids)) if a != b),
            len(fo.token_ids),
        )
        assert same >= 8  # chunked prefill (16-token budget) already reads int8 keys
        for i in range(same):
            assert (
                abs(
                    fo.logprobs[i][fo.token_ids[i]].logprob
                    - qo.logprobs[i][qo.token_ids[i]].logprob
                )
                < 0.1
            )


@pytest.mark.slow
def test_int8_kv_on_smollm2(smollm2_path):
    """Greedy int8-KV output follows the dense one until a near tie: where they part, the
    int8 run's token was within 0.15 nats of the dense run's choice (SmolLM2 has a tie at the
    5th token of this prompt that bf16 rounding alone can flip)."""
    prompt = "The history of the Roman Empire begins with"
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=3)
    outs = {
        kv: LLM(str(smollm2_path), kv_cache_dtype=kv, max_model_len=256)
        .generate(prompt, params, use_tqdm=False)[0]
        .outputs[0]
        for kv in ("auto", "int8")
    }
    f, q = outs["auto"], outs["int8"]
    same = next(
        (i for i, (a, b) in enumerate(zip(f.token_ids, q.token_ids)) if a != b), len(f.token_ids)
    )
    for i in range(same):
        dense, quant = f.logprobs[i][f.token_ids[i]].logprob, q.logprobs[i][q.token_ids[i]].logprob
        assert abs(dense - quant) < 0.15
    if same < len(f.token_ids):
        top = f.logprobs[same]
        assert q.token_ids[same] in top, "int8 KV chose a token outside the dense top 3"
        assert top[f.token_ids[same]].logprob - top[q.token_ids[same]].logprob < 0.15
