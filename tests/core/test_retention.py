"""Each retention policy without a model: what it evicts, how it lays a step out, what it
allows, and which one a cache config selects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from lamina.config import CacheConfig, SchedulerConfig
from lamina.engine.scheduler import Scheduler
from lamina.engine.sequence import Sequence
from lamina.kv.block_manager import BlockManager
from lamina.kv.h2o import H2OAttention, H2OPolicy
from lamina.kv.registry import registered_retention_policies, retention_policy_for
from lamina.kv.retention import RetentionPolicy
from lamina.kv.streaming import StreamingPolicy, StreamingWindow
from lamina.sampling_params import SamplingParams


@dataclass
class FakeSeq:
    """The fields of a sequence a policy reads (the SequenceKV protocol)."""

    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_evicted_blocks: int = 0
    kv_state: Any = None


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (CacheConfig(), RetentionPolicy),
        (CacheConfig(attention_sinks=4, sliding_window=64), StreamingPolicy),
        (CacheConfig(h2o_heavy=8, h2o_recent=8), H2OPolicy),
    ],
)
def test_the_cache_config_selects_the_policy(config, kind):
    assert type(retention_policy_for(config)) is kind
    assert set(registered_retention_policies()) >= {"dense", "streaming", "h2o"}


def test_dense_layout_is_logical_positions_and_table_slots():
    policy = RetentionPolicy(block_size=4)
    a, b = FakeSeq(5, [0, 1]), FakeSeq(0, [])
    step = policy.layout([a, b], [1, 3])
    assert step.positions == [5, 0, 1, 2]
    assert step.context_lens == [6, 3]
    assert step.slot_mapping is None
    assert step.attention is None
    assert policy.table_tokens(a, 1) == 6
    assert policy.max_blocks_per_request(max_model_len=17, step_tokens=8) == 5
    assert policy.allows_prefix_caching
    assert policy.allows_forks
    assert policy.allows_beam_search


def test_streaming_evicts_whole_blocks_behind_the_window_and_keeps_sinks():
    policy = StreamingPolicy(sinks=2, window=6, block_size=4)  # one sink block
    blocks = BlockManager(16, 4)
    seq = FakeSeq(num_computed_tokens=20)
    blocks.grow(seq.block_table, 20)
    table = list(seq.block_table)
    policy.before_step(seq, blocks)  # next query at 20 sees 15..20: blocks 1, 2 (4..11) go
    assert seq.block_table == [table[0], table[3], table[4]]
    assert seq.num_evicted_blocks == 2
    assert blocks.num_used_blocks == 3
    step = policy.layout([seq], [1])
    assert step.positions == [12]  # its index in the compacted cache (rotated on read)
    assert step.context_lens == [13]
    assert isinstance(step.attention, StreamingWindow)
    assert step.attention.offsets == [8]
    assert step.attention.sink_limit == 4
    assert policy.live_index(seq, 20) == 12
    assert policy.pinned_blocks == 1
    assert policy.keys_rotated_on_read
    assert not policy.allows_beam_search
    assert policy.max_positions() == 8


def test_h2o_fills_holes_first_and_positions_by_rank_when_asked():
    for by_rank in (False, True):
        policy = H2OPolicy(heavy=1, recent=2, block_size=4, cache_positions=by_rank)
        seq = FakeSeq()
        policy.start(seq)
        seq.block_table = [5, 6]
        step = policy.layout([seq], [4])  # slots 20..23
        assert step.slot_mapping is not None
        assert step.slot_mapping.tolist() == [20, 21, 22, 23]
        assert step.positions == [0, 1, 2, 3]
        seq.num_computed_tokens = 4
        seq.kv_state.scores = torch.tensor([5.0, 0.1, 3.0, 1.0])  # token 1: lightest old one
        policy.after_step(seq)
        assert seq.kv_state.positions == [0, 2, 3]
        step = policy.layout([seq], [1])
        assert step.slot_mapping is not None
        assert step.slot_mapping.tolist() == [21]
        assert step.positions == ([3] if by_rank else [4])
        assert isinstance(step.attention, H2OAttention)
        assert step.attention.keys_rotated_on_read == by_rank
        assert policy.max_positions() == (3 if by_rank else None)
    assert not policy.allows_prefix_caching
    assert not policy.allows_forks


def test_streaming_under_the_scheduler_stays_within_its_block_bound():
    """A long generation under StreamingLLM never holds more than the policy's bound."""
    policy = StreamingPolicy(sinks=4, window=16, block_size=4)
    blocks = BlockManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8, max_model_len=1 << 20), blocks, policy
    )
    seq = Sequence("s", list(range(3, 40)), SamplingParams(max_tokens=200))
    policy.start(seq)
    sched.add(seq)
    bound = policy.max_blocks_per_request(1 << 20, 8)
    # the sink block, the 16-token window plus one 8-token step (6 blocks), two of slack
    assert bound <= 1 + 6 + 2
    while not seq.is_finished:
        batch = sched.schedule()
        assert len(seq.block_table) <= bound
        for s in sched.advance(batch):
            s.append_token(7)
            if len(s.output_token_ids) == 200:
                s.finish("length")
                sched.finish(s)
    assert seq.num_evicted_blocks > 40
    blocks.check_all_free()
