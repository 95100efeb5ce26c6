"""H2O heavy-hitter eviction: a per-request budget of recent + most-attended tokens."""

from __future__ import annotations

import torch

from lamina import LLM, SamplingParams
from lamina.kv.h2o import H2OPolicy, H2OState

PROMPT = [(11 * i) % 250 + 3 for i in range(40)]


def test_evict_keeps_recent_and_heavy_hitters():
    policy = H2OPolicy(heavy=2, recent=3, block_size=4)
    state = H2OState()
    table = [5, 6, 7]
    policy.assign(state, table, range(0, 8))
    assert state.slots == [20, 21, 22, 23, 24, 25, 26, 27]
    state.scores = torch.tensor([5.0, 0.1, 9.0, 0.2, 0.3, 0.0, 0.0, 0.0])
    assert policy.evict(state) == 3
    assert state.positions == [0, 2, 5, 6, 7]  # heavy 0 and 2, recent 5-7
    assert sorted(state.holes) == [21, 23, 24]
    policy.assign(state, table, range(8, 10))  # new tokens fill holes first
    assert state.slots[-2:] == [24, 23]
    assert state.fresh_used == 8


def test_budget_covering_everything_equals_dense(tiny_model_factory, assert_retention_equals_dense):
    folder, _ = tiny_model_factory("llama_gqa")
    assert_retention_equals_dense(folder, PROMPT, 9, h2o_heavy=64, h2o_recent=64)


def test_scores_accumulate_attention_mass(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", h2o_heavy=100, h2o_recent=100)
    engine = llm.engine
    engine.add_request("r", PROMPT[:10], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # prefill: 10 queries x heads x layers, each a distribution over keys
    seq = engine.requests["r"].seqs[0]
    cfg = engine.model_config
    total = 10 * cfg.num_attention_heads * cfg.num_hidden_layers
    assert abs(float(seq.kv_state.scores.sum()) - total) < 1e-3
    assert float(seq.kv_state.scores[0]) > float(
        seq.kv_state.scores[-1]
    )  # early tokens seen by all
    engine.abort("r")
    engine.block_manager.check_all_free()


def test_memory_per_request_is_bounded(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(
        str(folder),
        dtype="float32",
        block_size=8,
        h2o_heavy=12,
        h2o_recent=12,
        max_num_batched_tokens=16,
    )
    engine = llm.engine
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    peak = 0
    kept = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_manager.num_used_blocks)
        if "a" in engine.requests:
            kept = max(kept, len(engine.requests["a"].seqs[0].kv_state.slots))
    assert kept <= 24 + 16  # budget + one step's tokens before eviction
    bound = engine.policy.max_blocks_per_request(engine.scheduler_config.max_model_len, 16)
    assert peak <= bound
    # 240 tokens (30 blocks dense) in the budget plus one step (40 tokens: 5 blocks) and a spare
    assert bound <= 5 + 1
    engine.block_manager.check_all_free()


def test_cache_positions_with_a_covering_budget_equals_dense(
    tiny_model_factory, assert_retention_equals_dense
):
    """Nothing evicted: every rank is the true position, so rank-positioned H2O (keys cached
    un-rotated, rotated when read) gives the dense result."""
    folder, _ = tiny_model_factory("llama_gqa")
    assert_retention_equals_dense(
        folder, PROMPT, 9, h2o_heavy=64, h2o_recent=64, h2o_cache_positions=True
    )


def test_cache_positions_stay_within_the_budget(tiny_model_factory):
    """Past the budget, no token (query or key) is rotated at a position beyond budget + one
    step, whatever the request's length; true-position H2O keeps counting."""
    folder, _ = tiny_model_factory("llama_gqa")
    seen: dict[bool, int] = {}
    for by_rank in (True, False):
        llm = LLM(
            str(folder),
            dtype="float32",
            block_size=8,
            h2o_heavy=8,
            h2o_recent=8,
            h2o_cache_positions=by_rank,
            max_num_batched_tokens=8,
        )
        rotary = llm.engine.loaded.model.rotary
        original = rotary.cos_sin
        most = [0]

        def spy(positions, dtype, rope_lens=None, original=original, most=most):
            most[0] = max(most[0], int(positions.max()))
            return original(positions, dtype, rope_lens)

        rotary.cos_sin = spy
        out = llm.generate(
            {"prompt_token_ids": PROMPT},
            SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
            use_tqdm=False,
        )[0]
        assert len(out.outputs[0].token_ids) == 60
        seen[by_rank] = most[0]
        llm.engine.block_manager.check_all_free()
    assert seen[True] < 16 + 8  # budget + one step of 8 tokens
    assert seen[False] == len(PROMPT) + 60 - 2  # the last fed token's true position


def test_cache_positions_needs_h2o():
    import pytest

    from lamina.config import CacheConfig

    with pytest.raises(ValueError, match="h2o_cache_positions needs H2O"):
        CacheConfig(h2o_cache_positions=True)
