"""The retention-policy seam: which of a request's tokens stay in the paged KV cache.

The scheduler, the model runner and the engine call a `RetentionPolicy` without knowing which
one it is. The base class *is* the dense policy (every token stays); StreamingLLM
(`kv/streaming.py`) and H2O (`kv/h2o.py`) override the few hooks they change. A policy decides:

- how many blocks one request can hold at most (`max_blocks_per_request`), so the engine can
  check the cache at start;
- what to drop before a step (`before_step`, block-level eviction) and after it (`after_step`,
  token-level eviction);
- how many tokens a sequence's block table must hold to feed `n` more (`table_tokens`) and where
  a logical position lives in its compacted table (`live_index`);
- the step's layout: rotary positions of the new tokens, live context lengths, cache slots (or
  the tables' next free slots), and the attention metadata it adds (`layout`);
- whether prefix caching, forks (n / best_of > 1) and beam search work under it.

Per-sequence state a policy needs (H2O's kept slots) lives in `seq.kv_state`, created by
`start` and cleared by `reset` when the sequence is preempted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from lamina.kv.block_manager import BlockManager

if TYPE_CHECKING:
    from lamina.config import CacheConfig


class RetentionAttention:
    """What a policy adds to attention (a mask or key layout the backend must apply). Each
    attention backend lists the kinds it supports; `keys_rotated_on_read` tells the model to
    cache keys un-rotated."""

    @property
    def keys_rotated_on_read(self) -> bool:
        return False


class SequenceKV(Protocol):
    """What a retention policy reads and edits of a sequence (lamina.engine.Sequence has it)."""

    block_table: list[int]
    num_computed_tokens: int
    num_evicted_blocks: int  # whole blocks dropped from the live table (after the pinned ones)
    kv_state: Any  # the policy's own per-sequence bookkeeping, or None


@dataclass
class StepLayout:
    """Where one step's new tokens go and how attention sees them."""

    positions: list[int]  # rotary position of every new token, sequences concatenated
    context_lens: list[int]  # tokens in each sequence's live cache once this step is written
    slot_mapping: torch.Tensor | None = None  # None: the next slots of each block table
    attention: RetentionAttention | None = None  # what the attention backend must also apply


class RetentionPolicy:
    """Dense retention: every token stays. Subclasses override what they change."""

    name: ClassVar[str] = "dense"
    allows_prefix_caching: ClassVar[bool] = True  # full blocks are a reusable prefix
    allows_forks: ClassVar[bool] = True  # n / best_of > 1 share blocks with their parent
    allows_beam_search: ClassVar[bool] = True
    # the RetentionAttention subclass its layouts carry (attention backends must support it)
    attention_kind: ClassVar[type[RetentionAttention] | None] = None

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    @classmethod
    def from_config(cls, cache: CacheConfig) -> RetentionPolicy | None:
        """This policy if the cache config asks for it, else None."""
        return cls(cache.block_size)

    # ---- capacity ------------------------------------------------------------------------
    def max_blocks_per_request(self, max_model_len: int, step_tokens: int) -> int:
        """Blocks one request can hold at most (`step_tokens`: one step's token budget)."""
        return -(-max_model_len // self.block_size)

    def max_positions(self) -> int | None:
        """The most rotary positions a request ever uses, if the policy bounds them (dynamic
        NTK sizes its base by it); None when positions grow with the request."""
        return None

    @property
    def pinned_blocks(self) -> int:
        """Leading blocks that are never evicted (they keep their index in the table)."""
        return 0

    @property
    def keys_rotated_on_read(self) -> bool:
        """Keys are cached un-rotated and rotated at their cache position when read."""
        return False

    # ---- per-sequence life ---------------------------------------------------------------
    def start(self, seq: SequenceKV) -> None:
        """Set up the policy's state for a sequence entering the engine."""

    def reset(self, seq: SequenceKV) -> None:
        """Forget the state of a preempted sequence (its blocks are already released)."""

    def before_step(self, seq: SequenceKV, blocks: BlockManager) -> None:
        """Release what the next step no longer sees (block-level eviction)."""

    def after_step(self, seq: SequenceKV) -> None:
        """Drop what the finished step made unnecessary (token-level eviction)."""

    # ---- geometry --------------------------------------------------------------------------
    def evicted_tokens(self, seq: SequenceKV) -> int:
        """Logical positions minus this = index in the (compacted) live table."""
        return seq.num_evicted_blocks * self.block_size

    def live_index(self, seq: SequenceKV, position: int) -> int:
        """Index in the live table of the token at logical `position`."""
        return position - self.evicted_tokens(seq)

    def table_tokens(self, seq: SequenceKV, n: int) -> int:
        """Tokens the block table must hold to feed `n` more."""
        return self.live_index(seq, seq.num_computed_tokens + n)

    def rotary_positions(self, seq: SequenceKV, n: int) -> range:
        """Positions the next `n` tokens are rotated at: their logical positions."""
        start = seq.num_computed_tokens
        return range(start, start + n)

    def layout(self, seqs: Sequence[SequenceKV], num_new: Sequence[int]) -> StepLayout:
        """Positions and live context lengths of one step; slots come from the tables."""
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, n in zip(seqs, num_new):
            positions.extend(self.rotary_positions(seq, n))
            context_lens.append(self.live_index(seq, seq.num_computed_tokens + n))
        return StepLayout(positions, context_lens)
