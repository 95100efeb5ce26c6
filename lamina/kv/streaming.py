"""StreamingLLM (Xiao et al., 2023): a request keeps its first `sinks` tokens (the "attention
sinks") and its last `window` tokens, in bounded memory whatever its length.

Eviction is by whole blocks: a block leaves the cache (and returns to the pool) once every token
in it is older than the window of the next query; the attention mask then hides, token by
token, what the kept blocks still hold beyond the window, so the result does not depend on the
block size.

Positions are assigned within the cache, as the paper prescribes: keys are stored un-rotated and
rotated when read, at their index in the compacted cache (sink blocks, then the live window
blocks). Storing rotated keys would force re-rotating every kept key each time a block is
evicted (their cache positions all shift), accumulating rounding; rotating on read costs one
rotation of the gathered keys, next to the gather itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lamina.kv.block_manager import BlockManager
from lamina.kv.retention import (
    RetentionAttention,
    RetentionPolicy,
    SequenceKV,
    StepLayout,
)

if TYPE_CHECKING:
    from lamina.config import CacheConfig


@dataclass
class StreamingWindow(RetentionAttention):
    """StreamingLLM attention: keys are stored un-rotated; each sequence sees its first `sinks`
    tokens and its last `window` tokens. A live cache index c maps to logical position
    c + offsets[i] once past `sink_limit` (the sink blocks), c itself before."""

    sinks: int
    window: int
    sink_limit: int
    offsets: list[int]

    @property
    def keys_rotated_on_read(self) -> bool:
        return True


class StreamingPolicy(RetentionPolicy):
    name = "streaming"
    allows_beam_search = False  # beams would need their own windows; not implemented
    attention_kind = StreamingWindow

    def __init__(self, sinks: int, window: int, block_size: int) -> None:
        super().__init__(block_size)
        self.sinks = sinks
        self.window = window

    @classmethod
    def from_config(cls, cache: CacheConfig) -> StreamingPolicy | None:
        if cache.sliding_window is None:
            return None
        return cls(cache.attention_sinks, cache.sliding_window, cache.block_size)

    @property
    def sink_blocks(self) -> int:
        """Leading blocks that are never evicted (they hold the sink tokens)."""
        return -(-self.sinks // self.block_size)

    @property
    def pinned_blocks(self) -> int:
        return self.sink_blocks

    @property
    def keys_rotated_on_read(self) -> bool:
        return True

    def max_blocks_per_request(self, max_model_len: int, step_tokens: int) -> int:
        """Sinks, the window, one step's chunk, slack (or less, for short contexts)."""
        bound = self.sink_blocks + -(-(self.window + step_tokens) // self.block_size) + 2
        return min(bound, super().max_blocks_per_request(max_model_len, step_tokens))

    def max_positions(self) -> int:
        return self.sinks + self.window

    def before_step(self, seq: SequenceKV, blocks: BlockManager) -> None:
        """Free the blocks whose tokens all lie before the window of the next query."""
        self.evict(seq, blocks, seq.num_computed_tokens)

    def evict(self, seq: SequenceKV, blocks: BlockManager, first_query: int) -> int:
        """Free the blocks whose tokens all lie before the window of `first_query` (the first
        position computed next). Returns how many blocks were freed."""
        bs = self.block_size
        freed = 0
        while True:
            logical = self.sink_blocks + seq.num_evicted_blocks
            index = self.sink_blocks  # the oldest non-sink block in the live table
            if index >= len(seq.block_table) or (logical + 1) * bs > first_query + 1 - self.window:
                return freed
            blocks.release([seq.block_table.pop(index)])
            seq.num_evicted_blocks += 1
            freed += 1

    def rotary_positions(self, seq: SequenceKV, n: int) -> range:
        """Queries are rotated at their index in the compacted cache, like the keys."""
        live = self.live_index(seq, seq.num_computed_tokens)
        return range(live, live + n)

    def layout(self, seqs: Sequence[SequenceKV], num_new: Sequence[int]) -> StepLayout:
        step = super().layout(seqs, num_new)
        offsets = [self.evicted_tokens(s) for s in seqs]
        step.attention = StreamingWindow(
            self.sinks, self.window, self.sink_blocks * self.block_size, offsets
        )
        return step
