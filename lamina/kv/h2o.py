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

from dataclasses import dataclass, field

import torch


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


@dataclass(frozen=True)
class H2OPolicy:
    heavy: int
    recent: int
    block_size: int
    # rotate by rank among the kept tokens (keys cached un-rotated, rotated when read)
    cache_positions: bool = False

    @property
    def budget(self) -> int:
        return self.heavy + self.recent

    def blocks_needed(self, max_num_batched_tokens: int) -> int:
        """Blocks one request can hold at most: the budget plus one step's tokens."""
        return -(-(self.budget + max_num_batched_tokens) // self.block_size) + 1

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
