"""H2O heavy-hitter eviction (Zhang et al., 2023): a per-request KV budget of `recent` most
recent tokens plus the `heavy` tokens with the largest accumulated attention.

Unlike StreamingLLM, eviction here is token by token, so a request's cache is a set of slots
rather than a run of blocks: each request keeps the slots of its kept tokens (in order), their
logical positions (keys are stored rotated at their true positions, as in the paper) and their
accumulated attention. An evicted token's slot becomes a hole that the request's next token
fills, so the request never holds more than budget + one step's tokens. Scores are summed over
heads, queries and layers, because one slot layout is shared by every layer (the paper keeps a
separate set per head; this is the standard shared-budget simplification).

With `cache_positions`, keys are cached un-rotated and every token is rotated at its rank among
the request's kept tokens (queries included), the StreamingLLM recipe applied to H2O's kept
set: relative distances shrink as tokens are evicted, but no position ever exceeds budget + one
step, so a request can outgrow the trained context. The causal mask still uses true positions.

Prefix caching is off for such requests (blocks with holes are not a prefix), and forks
(n > 1, beams) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lamina.kv.retention import (
    RetentionAttention,
    RetentionPolicy,
    SequenceKV,
    StepLayout,
)

if TYPE_CHECKING:
    from lamina.config import CacheConfig


@dataclass
class H2OState:
    """Per-sequence kept-token bookkeeping."""

    slots: list[int] = field(default_factory=list)  # physical slots of kept tokens, in order
    positions: list[int] = field(default_factory=list)  # their logical positions
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # accumulated attention
    holes: list[int] = field(default_factory=list)  # slots freed by eviction, reused first
    fresh_used: int = 0  # slots taken from the block table so far

    def reset(self) -> None:
        self.slots.clear()
        self.positions.clear()
        self.scores = torch.zeros(0)
        self.holes.clear()
        self.fresh_used = 0


@dataclass
class H2OAttention(RetentionAttention):
    """H2O attention, per sequence: the kept slots (new tokens included, in order), their
    logical positions, and the accumulated attention each kept token has received, which the
    backend adds to in place."""

    slots: list[torch.Tensor]
    positions: list[torch.Tensor]
    scores: list[torch.Tensor]
    cache_positions: bool = False  # keys cached un-rotated, rotated at their rank when read

    @property
    def keys_rotated_on_read(self) -> bool:
        return self.cache_positions


class H2OPolicy(RetentionPolicy):
    name = "h2o"
    allows_prefix_caching = False  # blocks with holes are no reusable prefix
    allows_forks = False  # kept sets are per sequence: a fork would need a copy of each
    allows_beam_search = False
    attention_kind = H2OAttention

    def __init__(
        self, heavy: int, recent: int, block_size: int, cache_positions: bool = False
    ) -> None:
        super().__init__(block_size)
        self.heavy = heavy
        self.recent = recent
        # rotate by rank among the kept tokens (keys cached un-rotated, rotated when read)
        self.cache_positions = cache_positions

    @classmethod
    def from_config(cls, cache: CacheConfig) -> H2OPolicy | None:
        if cache.h2o_heavy is None or cache.h2o_recent is None:
            return None
        return cls(cache.h2o_heavy, cache.h2o_recent, cache.block_size, cache.h2o_cache_positions)

    @property
    def budget(self) -> int:
        return self.heavy + self.recent

    @property
    def keys_rotated_on_read(self) -> bool:
        return self.cache_positions

    def max_blocks_per_request(self, max_model_len: int, step_tokens: int) -> int:
        """The budget plus one step's tokens (or less, for short contexts)."""
        bound = -(-(self.budget + step_tokens) // self.block_size) + 1
        return min(bound, super().max_blocks_per_request(max_model_len, step_tokens))

    def max_positions(self) -> int | None:
        return self.budget if self.cache_positions else None

    def start(self, seq: SequenceKV) -> None:
        seq.kv_state = H2OState()

    def reset(self, seq: SequenceKV) -> None:
        seq.kv_state.reset()

    def after_step(self, seq: SequenceKV) -> None:
        self.evict(seq.kv_state)

    def table_tokens(self, seq: SequenceKV, n: int) -> int:
        return self.live_tokens_after(seq.kv_state, n)

    def layout(self, seqs: Sequence[SequenceKV], num_new: Sequence[int]) -> StepLayout:
        """Give the new tokens slots (holes first) and list every sequence's kept tokens;
        with cache positions each new token is rotated at its rank among the kept ones."""
        slots: list[int] = []
        positions: list[int] = []
        info = H2OAttention([], [], [], cache_positions=self.cache_positions)
        for seq, n in zip(seqs, num_new):
            state: H2OState = seq.kv_state
            start = seq.num_computed_tokens
            slots += self.assign(state, seq.block_table, range(start, start + n))
            kept = len(state.slots)
            positions.extend(
                range(kept - n, kept) if self.cache_positions else range(start, start + n)
            )
            info.slots.append(torch.tensor(state.slots))
            info.positions.append(torch.tensor(state.positions))
            info.scores.append(state.scores)
        context_lens = [len(s) for s in info.slots]
        return StepLayout(positions, context_lens, torch.tensor(slots, dtype=torch.int64), info)

    def live_tokens_after(self, state: H2OState, n: int) -> int:
        """Fresh slots the table must hold once `n` more tokens are written."""
        return state.fresh_used + max(0, n - len(state.holes))

    def assign(self, state: H2OState, table: list[int], positions: range) -> list[int]:
        """Slots for new tokens at `positions`: holes first, then fresh slots of the table."""
        slots = []
        for p in positions:
            if state.holes:
                slot = state.holes.pop()
            else:
                i = state.fresh_used
                slot = table[i // self.block_size] * self.block_size + i % self.block_size
                state.fresh_used += 1
            slots.append(slot)
            state.slots.append(slot)
            state.positions.append(p)
        state.scores = torch.cat([state.scores, torch.zeros(len(slots))])
        return slots

    def evict(self, state: H2OState) -> int:
        """Drop the lowest-scored tokens outside the recent window until the budget holds."""
        excess = len(state.slots) - self.budget
        if excess <= 0:
            return 0
        candidates = len(state.slots) - self.recent
        drop = set(torch.topk(state.scores[:candidates], excess, largest=False).indices.tolist())
        keep = [i for i in range(len(state.slots)) if i not in drop]
        state.holes.extend(state.slots[i] for i in drop)
        state.slots = [state.slots[i] for i in keep]
        state.positions = [state.positions[i] for i in keep]
        state.scores = state.scores[keep]
        return excess
