"""Continuous batching with chunked prefill and preemption by recomputation.

Each step gets a token budget. Running sequences go first (a decode costs one token, an
unfinished prompt a chunk of what remains); then waiting sequences are admitted while budget,
`max_num_seqs` and free blocks allow. When the cache runs out of blocks, the most recently
admitted running sequence is preempted: its blocks are freed and it goes back to the front of the
queue, keeping its generated tokens, which are recomputed with the prompt when it resumes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lamina.config import SchedulerConfig
from lamina.engine.sequence import Sequence, SequenceStatus
from lamina.kv.block_manager import BlockManager


@dataclass
class ScheduledBatch:
    """Sequences to run this step and how many new tokens each feeds."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            target = seq.num_computed_tokens + n
            while not self.blocks.can_grow(seq.block_table, target):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                break
            self.blocks.grow(seq.block_table, target)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
