"""Hands out KV cache blocks: ref-counted, like pages of virtual memory (Kwon et al., 2023)."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Free list plus reference counts over `num_blocks` physical blocks.

    A sequence's block table lists its blocks in order; token p lives in block
    table[p // block_size]. Blocks may be shared (ref count > 1) by forks of a sequence.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        """Whether the table can be extended to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(table) <= len(self.free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `table` until it holds `num_tokens` tokens."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free)} free")
        for _ in range(need):
            block = self.free.popleft()
            self.ref_counts[block] = 1
            table.append(block)

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` and empty it."""
        for block in table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free.append(block)
            elif self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} released more often than allocated")
        table.clear()

    def check_all_free(self) -> None:
        """Assert no block is held (used by tests and at shutdown)."""
        held = [b for b, c in enumerate(self.ref_counts) if c != 0]
        if held or len(self.free) != self.num_blocks:
            raise AssertionError(f"blocks still referenced: {held[:10]}")
