"""The scheduler without a model: admission, the chunked-prefill token budget, preemption and
resumption, fairness, and the block pool after any workload (property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.config import SchedulerConfig
from lamina.engine.scheduler import Scheduler, SchedulerOutput
from lamina.engine.sequence import Sequence, SequenceStatus
from lamina.kv.block_manager import BlockManager
from lamina.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, caching: bool = False):
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=4096
    )
    return Scheduler(config, BlockManager(num_blocks, BS, caching))


def seq(name: str, prompt_len: int, max_tokens: int = 4, first: int = 3) -> Sequence:
    prompt = [first + i for i in range(prompt_len)]
    return Sequence(name, prompt, SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler) -> SchedulerOutput:
    """One step as the engine runs it, with token 7 "sampled" for every complete sequence."""
    batch = sched.schedule()
    for s in sched.advance(batch):
        s.append_token(7)
        if len(s.output_token_ids) >= (s.sampling_params.max_tokens or 1):
            s.finish("length")
            sched.finish(s)
    return batch


def test_admission_in_arrival_order_within_max_num_seqs():
    sched = make(max_seqs=2, budget=100)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a, b]
    assert batch.num_new_tokens == [5, 5]
    assert list(sched.waiting) == [c]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched = make(budget=16)
    long = seq("long", 40)
    sched.add(long)
    sizes = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        sizes.append(run_step(sched).num_new_tokens)
    assert sizes == [[16], [16], [8]]
    assert len(long.output_token_ids) == 1  # sampled once the last chunk was computed


def test_running_decodes_go_before_new_prefills():
    sched = make(budget=10)
    a = seq("a", 6)
    sched.add(a)
    run_step(sched)  # a prefilled and sampled a token
    b = seq("b", 30)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b]
    assert batch.num_new_tokens == [1, 9]


def test_preemption_frees_the_newest_and_resumes_it_first():
    sched = make(num_blocks=6, budget=64)  # 24 token slots
    a, b = seq("a", 8, max_tokens=12), seq("b", 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert a.status == b.status == SequenceStatus.RUNNING
    while sched.stats.num_preemptions == 0:
        run_step(sched)
    assert b.status == SequenceStatus.WAITING
    assert next(iter(sched.waiting)) is b
    assert b.block_table == []
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert len(b.output_token_ids) > 0
    while sched.has_unfinished():
        run_step(sched)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 12
    sched.blocks.check_all_free()


def test_chunk_cap_and_whole_prompt_flag():
    sched = make(budget=64, caching=True)
    first = seq("first", 12)
    sched.add(first)
    run_step(sched)
    scored = seq("scored", 12)  # same prompt: its full blocks are cached
    scored.max_chunk, scored.reads_every_position = 5, True
    sched.add(scored)
    assert sched.schedule().num_new_tokens[-1] == 5  # its cap, and no cached prefix taken
    assert scored.num_cached_tokens == 0


@settings(max_examples=60, deadline=None, database=None)
@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6)),
        min_size=1,
        max_size=12,
    ),
    num_blocks=st.integers(13, 40),
    budget=st.integers(1, 48),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
)
def test_any_workload_finishes_within_budget_and_frees_every_block(
    lengths, num_blocks, budget, max_seqs, caching
):
    """Random prompts and outputs, arriving over time: every step stays within the token
    budget, max_num_seqs and the pool; ref counts match the tables; every request finishes
    (no starvation) in a bounded number of steps; no block leaks."""
    sched = make(num_blocks, budget, max_seqs, caching)
    seqs = [
        (arrival, seq(f"r{i}", prompt, out, first=3 + i % 2))
        for i, (prompt, out, arrival) in enumerate(lengths)
    ]
    total = sum(p + o for p, o, _ in lengths)
    for step in range(10 * total + 50):
        for arrival, s in seqs:
            if arrival == step:
                sched.add(s)
        if step > max(a for a, _ in seqs) and not sched.has_unfinished():
            break
        batch = run_step(sched)
        assert sum(batch.num_new_tokens) <= budget
        assert len(sched.running) <= max_seqs
        held = [0] * num_blocks
        for s in sched.running + list(sched.waiting):
            for block in s.block_table:
                held[block] += 1
        cached_free = [b for b in range(num_blocks) if sched.blocks.ref_counts[b] == 0]
        assert held == sched.blocks.ref_counts
        assert sorted(sched.blocks.free) == cached_free
    assert not sched.has_unfinished(), "a request starved"
    for _, s in seqs:
        assert len(s.output_token_ids) == s.sampling_params.max_tokens
    sched.blocks.check_all_free()
