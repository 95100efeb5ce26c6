"""Continuous batching with chunked prefill, prefix caching and preemption by recomputation.

Each step has a token budget. Running sequences go first (a decode costs one token, an
unfinished prompt a chunk of what remains); then waiting sequences are admitted, in arrival
order, while budget, `max_num_seqs` and free blocks allow. A newly admitted sequence first takes
whatever full blocks of its prefix are already cached and skips their prefill. When the cache
runs out of blocks, the most recently admitted running sequence is preempted: its blocks are
released and it returns to the front of the queue keeping its generated tokens, which are
recomputed together with the prompt when it resumes (often from the prefix cache).

What a sequence keeps in the cache is the retention policy's business (kv/retention.py): the
scheduler asks it how many tokens the block table must hold, where a position lives in the
table, and lets it evict before a step and after one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lamina.config import SchedulerConfig
from lamina.engine.sequence import Sequence, SequenceStatus
from lamina.kv.block_manager import BlockManager
from lamina.kv.retention import RetentionPolicy


@dataclass
class SchedulerOutput:
    """One step's work: the sequences to run, how many new tokens each feeds, and block copies
    (copy-on-write of shared blocks) to make before the forward pass.

    A sequence may feed any number of tokens: a prefill chunk, its one newest token, or (for
    speculative verification) its newest token plus proposed ones. The sequences of one
    request (n > 1 samples, a beam group) are separate entries; what their logits become is
    decided per request by the output processor.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    num_guesses: list[int] = field(default_factory=list)  # of num_new_tokens, guessed ones

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.num_guesses.append(len(seq.spec_tokens))


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0  # prefill actually run (cached prefixes excluded)
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, found cached


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        policy: RetentionPolicy | None = None,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.policy = policy or RetentionPolicy(blocks.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence joins the batch directly (its blocks are shared)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.spec_tokens.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        seq.num_evicted_blocks = 0
        self.policy.reset(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def evict_for_step(self, seq: Sequence) -> None:
        """Let the retention policy drop what the next step no longer sees."""
        self.policy.before_step(seq, self.blocks)

    def blocks_target(self, seq: Sequence, n: int) -> int:
        """Tokens the block table must hold to feed `n` more tokens."""
        return self.policy.table_tokens(seq, n)

    def chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` feeds next within `budget` (its own cap, if any, too): what is not
        computed yet, then its guessed tokens (those past the budget are dropped)."""
        real = seq.num_tokens - seq.num_computed_tokens
        n = min(real + len(seq.spec_tokens), budget)
        del seq.spec_tokens[max(0, n - real) :]
        return n if seq.max_chunk is None else min(n, seq.max_chunk)

    def _needs_copy(self, seq: Sequence) -> bool:
        idx = self.policy.live_index(seq, seq.num_computed_tokens) // self.blocks.block_size
        table = seq.block_table
        return idx < len(table) and self.blocks.ref_counts[table[idx]] > 1

    def schedule(self) -> SchedulerOutput:
        batch = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self.chunk(seq, budget)
            if n <= 0:
                continue
            self.evict_for_step(seq)
            target = self.blocks_target(seq, n)
            while not self.blocks.can_grow(seq.block_table, target, int(self._needs_copy(seq))):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            copy = self.blocks.copy_on_write(
                seq.block_table, self.policy.live_index(seq, seq.num_computed_tokens)
            )
            if copy is not None:
                batch.copies.append(copy)
            self.blocks.grow(seq.block_table, target)
            batch.add(seq, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self._reuse_cached_prefix(seq)
                self.evict_for_step(seq)
            n = self.chunk(seq, budget)
            target = self.blocks_target(seq, n)
            if not self.blocks.can_grow(seq.block_table, target):
                self.blocks.release(seq.block_table)  # give back any prefix blocks taken
                seq.block_hashes.clear()
                seq.num_computed_tokens = 0
                seq.num_evicted_blocks = 0
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, target)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def advance(self, batch: SchedulerOutput) -> list[Sequence]:
        """After the forward pass: mark the fed tokens computed, index blocks that are now
        full for prefix caching, let the retention policy evict, and return the sequences
        whose every token is computed (their last row's logits decide what comes next)."""
        complete = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            before = seq.num_computed_tokens
            # guessed tokens count once verification accepts them (`settle_guesses`)
            seq.num_computed_tokens += n - len(seq.spec_tokens)
            self.stats.prompt_tokens_computed += max(
                0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - before
            )
            self._register(seq)
            self.policy.after_step(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                complete.append(seq)
        return complete

    def _register(self, seq: Sequence) -> None:
        self.blocks.register_full_blocks(
            seq.block_table,
            seq.block_hashes,
            seq.token_ids,
            seq.num_computed_tokens,
            self.policy.pinned_blocks,
            seq.num_evicted_blocks,
            seq.rope_len,
        )

    def settle_guesses(self, seq: Sequence, accepted: int) -> None:
        """After verification: the first `accepted` guesses' K/V (written this step) are kept,
        and the blocks that held only rejected guesses go back to the pool. Rejected slots in a
        kept block are simply overwritten later: rollback is bookkeeping, nothing is copied."""
        seq.spec_tokens.clear()
        seq.num_computed_tokens += accepted
        self._register(seq)
        keep = self.blocks.blocks_needed(seq.num_tokens)
        if len(seq.block_table) > keep:
            self.blocks.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _reuse_cached_prefix(self, seq: Sequence) -> None:
        """Take the cached full blocks of the sequence's prefix, keeping at least one token to
        compute (its logits are needed). Requests that read every prompt position (prompt
        logprobs, scoring) compute everything."""
        if seq.sampling_params.prompt_logprobs is not None or seq.reads_every_position:
            return
        max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
        blocks, hashes = self.blocks.match_prefix(seq.token_ids, max_blocks, seq.rope_len)
        for block in blocks:
            self.blocks.acquire(block)
        seq.block_table.extend(blocks)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(blocks) * self.blocks.block_size
        if seq.num_preemptions == 0:
            self.stats.prefix_cache_queries += seq.num_prompt_tokens
            self.stats.prefix_cache_hits += seq.num_computed_tokens
            seq.num_cached_tokens = seq.num_computed_tokens
