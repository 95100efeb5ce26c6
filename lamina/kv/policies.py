"""KV retention policies that bound a request's memory while its length is unbounded.

StreamingLLM (Xiao et al., 2023): a request keeps its first `sinks` tokens (the "attention
sinks") and its last `window` tokens. Eviction is by whole blocks: a block leaves the cache (and
returns to the pool) once every token in it is older than the window of the next query; the
attention mask then hides, token by token, what the kept blocks still hold beyond the window,
so the result does not depend on the block size.

Positions are assigned within the cache, as the paper prescribes: keys are stored un-rotated and
rotated when read, at their index in the compacted cache (sink blocks, then the live window
blocks). Storing rotated keys would force re-rotating every kept key each time a block is
evicted (their cache positions all shift), accumulating rounding; rotating on read costs one
rotation of the gathered keys, next to the gather itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from lamina.engine.sequence import Sequence
from lamina.kv.block_manager import BlockManager


@dataclass(frozen=True)
class StreamingPolicy:
    sinks: int
    window: int
    block_size: int

    @property
    def sink_blocks(self) -> int:
        """Leading blocks that are never evicted (they hold the sink tokens)."""
        return -(-self.sinks // self.block_size)

    def evict(self, seq: Sequence, blocks: BlockManager, first_query: int) -> int:
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

    def blocks_needed(self, max_num_batched_tokens: int) -> int:
        """Blocks one request can hold at most: sinks, the window, one step's chunk, slack."""
        return self.sink_blocks + -(-(self.window + max_num_batched_tokens) // self.block_size) + 2
