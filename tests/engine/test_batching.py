"""Continuous batching: many requests at once give what each gives alone; preemption, aborts and
prefix caching leave the block pool exact."""

from __future__ import annotations

import random

import pytest
import torch

from lamina import LLM, SamplingParams


def varied_requests(n: int, vocab: int, shared_len: int, seed: int = 0):
    """Mixed prompt lengths, a third sharing one long prefix, max_tokens from 1 to 128."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(shared_len)]
    prompts, params = [], []
    for i in range(n):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 90))]
        prompts.append(shared + tail if i % 3 == 0 else tail)
        max_tokens = [1, 128][i] if i < 2 else rng.randint(1, 128)
        params.append(
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
        )
    return prompts, params


def run(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.block_manager.check_all_free()
    return outs


def test_48_requests_together_equal_alone(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(
        str(folder), dtype="float32", block_size=8, max_num_seqs=16, max_num_batched_tokens=96
    )
    prompts, params = varied_requests(48, 256, shared_len=40)
    together = run(llm, prompts, params)
    assert len(together) == len(prompts) == 48
    assert llm.engine.stats.prefix_cache_hits > 0
    for prompt, p, out in zip(prompts, params, together):
        alone = run(llm, [prompt], [p])[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == p.max_tokens


def test_preemption_under_small_kv_budget(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(5, 40))] for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    big = run(LLM(str(folder), dtype="float32", block_size=8), prompts, params)
    # 24 blocks of 8 tokens: room for only a few of the 32 requests (each needs up to 11)
    small_llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=24, max_model_len=96)
    small = run(small_llm, prompts, params)
    assert small_llm.engine.stats.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in big]
    assert all(len(o.outputs[0].token_ids) == 48 for o in small)


def test_aborts_mid_prefill_and_mid_decode_free_everything(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=16)
    engine = llm.engine
    long_prompt = list(range(3, 120))
    engine.add_request("prefill", long_prompt, SamplingParams(max_tokens=20))
    engine.add_request("decode", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request(
        "forks",
        [5, 6, 7, 8, 9],
        SamplingParams(n=3, temperature=1.0, max_tokens=50, ignore_eos=True),
    )
    engine.add_request("queued", [9] * 30, SamplingParams(max_tokens=5))
    engine.step()  # 16-token budget: the long prompt is mid-prefill
    seq = engine.requests["prefill"].seqs[0]
    assert 0 < seq.num_computed_tokens < len(long_prompt)
    engine.abort("prefill")
    for _ in range(4):
        engine.step()
    assert len(engine.requests["decode"].seqs[0].output_token_ids) > 0
    assert len(engine.requests["forks"].seqs) == 3
    engine.abort(["decode", "forks", "queued", "unknown-id"])
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running
    assert not engine.scheduler.waiting
    engine.block_manager.check_all_free()


def test_prefix_cache_computes_only_the_suffix(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    rng = random.Random(5)
    prefix = [rng.randrange(3, 256) for _ in range(512)]
    a = prefix + [rng.randrange(3, 256) for _ in range(7)]
    b = prefix + [rng.randrange(3, 256) for _ in range(9)]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)

    def two(enable: bool):
        llm = LLM(
            str(folder),
            dtype="float32",
            block_size=16,
            enable_prefix_caching=enable,
            max_model_len=1024,
        )
        first = run(llm, [a], [params])[0]
        before = llm.engine.stats.prompt_tokens_computed
        second = run(llm, [b], [params])[0]
        return first, second, llm.engine.stats.prompt_tokens_computed - before

    _, cached_b, computed = two(True)
    _, plain_b, computed_plain = two(False)
    assert computed == len(b) - 512
    assert cached_b.num_cached_tokens == 512
    assert computed_plain == len(b)
    assert cached_b.outputs[0].token_ids == plain_b.outputs[0].token_ids
    assert len(cached_b.outputs[0].logprobs) == len(plain_b.outputs[0].logprobs) == 8
    for pos_c, pos_p in zip(cached_b.outputs[0].logprobs, plain_b.outputs[0].logprobs):
        assert pos_c.keys() == pos_p.keys()
        for tok in pos_c:
            assert abs(pos_c[tok].logprob - pos_p[tok].logprob) < 1e-4


def test_n_samples_share_prompt_blocks(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    prompt = list(range(3, 99))  # 96 tokens = 6 blocks of 16

    def peak_blocks(prompts, params):
        llm = LLM(str(folder), dtype="float32", block_size=16, enable_prefix_caching=False)
        engine, peak = llm.engine, 0
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, sp)
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, engine.block_manager.num_used_blocks)
        engine.block_manager.check_all_free()
        return peak

    sp = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=0)
    forked = peak_blocks(
        [prompt], [SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True, seed=0)]
    )
    separate = peak_blocks([prompt] * 4, [sp] * 4)
    assert forked < separate
    assert forked <= 6 + 4 * 2  # shared prompt + each sample's own tail blocks


def test_n_and_best_of_outputs(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32")
    out = llm.generate(
        {"prompt_token_ids": [5, 6, 7]},
        SamplingParams(n=3, best_of=5, temperature=1.0, max_tokens=10, ignore_eos=True, seed=11),
        use_tqdm=False,
    )[0]
    assert len(out.outputs) == 3
    assert [o.index for o in out.outputs] == [0, 1, 2]
    scores = [o.cumulative_logprob for o in out.outputs]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    llm.engine.block_manager.check_all_free()


@pytest.mark.slow
def test_smollm2_48_requests_batched_match_teacher_forced(smollm2_llm):
    """Each batched greedy output is what greedy decoding alone would give: every token is the
    argmax of a separate full-context forward (teacher forcing) — exact, or where float rounding
    differs, each side's token is in the other's top 5 (vLLM's check_logprobs_close)."""
    llm = smollm2_llm
    prompts, params = varied_requests(48, llm.engine.model_config.vocab_size, shared_len=200)
    outs = run(llm, prompts, params)
    exact = close = 0
    for prompt, out in zip(prompts, outs):
        toks = out.outputs[0].token_ids
        logits = llm.engine.prompt_logits(prompt + toks[:-1])[len(prompt) - 1 :]
        ref = logits.argmax(-1).tolist()
        first_diff = next((i for i, (x, y) in enumerate(zip(toks, ref)) if x != y), None)
        if first_diff is None:
            exact += 1
            continue
        ours_top5 = out.outputs[0].logprobs[first_diff]
        ref_top5 = torch.topk(logits[first_diff], 5).indices.tolist()
        assert toks[first_diff] in ref_top5, (prompt, first_diff)
        assert ref[first_diff] in ours_top5, (prompt, first_diff)
        close += 1
    print(f"\n48 batched requests: {exact} exact, {close} within top-5 at first divergence")
    assert exact >= 44
