"""Hands out KV cache blocks like pages of virtual memory (Kwon et al., 2023).

Blocks are ref-counted: forks of a sequence (n > 1, beams) and requests with a common prefix
share them. Full blocks are content-addressed for prefix caching: a block's hash covers its
token ids and the hash of the block before it, so equal hashes mean equal whole prefixes. A
freed block keeps its hash and stays findable until it is handed out again; the free pool is
kept in least-recently-freed order so the coldest cached block is reused first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hash(prev: int | None, tokens: Sequence[int]) -> int:
    """Hash of one full block given the hash of its predecessor (None for the first)."""
    return hash((prev, tuple(tokens)))


def root_hash(salt: int | None) -> int | None:
    """The "predecessor" of a sequence's first block: None, or a hash of `salt` for sequences
    whose keys are not interchangeable with unsalted ones (dynamic NTK's per-sequence base)."""
    return None if salt is None else hash(("salt", salt))


class BlockManager:
    """Free pool, reference counts and the prefix-cache index over `num_blocks` blocks.

    A sequence's block table lists its blocks in order: token p lives in block
    table[p // block_size] at offset p % block_size.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block holding that content
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.peak_used_blocks = 0  # high-water mark (benchmarks reset it to 0)

    # ---- accounting -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int, extra: int = 0) -> bool:
        """Whether `table` can be extended to hold `num_tokens` tokens (plus `extra` blocks)."""
        return self.blocks_needed(num_tokens) - len(table) + extra <= len(self.free)

    def check_all_free(self) -> None:
        """Raise if any block is still referenced (tests and shutdown use this)."""
        held = [b for b, c in enumerate(self.ref_counts) if c != 0]
        if held or len(self.free) != self.num_blocks:
            raise AssertionError(f"blocks still referenced: {held[:10]} (of {len(held)})")

    # ---- allocation -----------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:  # evict its cached content
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return block

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `table` until it holds `num_tokens` tokens."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free)} free")
        table.extend(self._take_free() for _ in range(need))

    def acquire(self, block: int) -> None:
        """Take one more reference to an existing (possibly free but cached) block."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` and empty it."""
        for block in reversed(table):  # the prefix's head is freed last, so evicted last
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            self.ref_counts[block] = count
            if count == 0:
                self.free[block] = None
        table.clear()

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (copy-on-write later)."""
        for block in table:
            self.ref_counts[block] += 1
        return list(table)

    def copy_on_write(self, table: list[int], position: int) -> tuple[int, int] | None:
        """Before writing token `position`: if its block is shared, give this table a private
        copy. Returns (src, dst) for the cache to copy, or None if the block is private."""
        idx = position // self.block_size
        if idx >= len(table) or self.ref_counts[table[idx]] == 1:
            return None
        src = table[idx]
        self.ref_counts[src] -= 1
        dst = self._take_free()
        table[idx] = dst
        return src, dst

    # ---- prefix caching -------------------------------------------------------------------
    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int, salt: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Cached blocks holding the longest prefix of `token_ids` (at most `max_blocks`), with
        their hashes, among blocks registered with the same `salt`. No references are taken."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        prev = root_hash(salt)
        bs = self.block_size
        for i in range(max_blocks):
            h = block_hash(prev, token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            prev = h
        return blocks, hashes

    def register_full_blocks(
        self,
        table: list[int],
        hashes: list[int],
        token_ids: Sequence[int],
        num_computed: int,
        sink_blocks: int = 0,
        evicted: int = 0,
        salt: int | None = None,
    ) -> None:
        """Hash every block that is now full of computed tokens and index it, so later requests
        with the same prefix can share it. `hashes` (one per logical block) is extended in place.
        With evicted blocks, logical block i >= sink_blocks sits at table[i - evicted]. `salt`:
        as in `match_prefix`."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = block_hash(
                hashes[-1] if hashes else root_hash(salt), token_ids[i * bs : (i + 1) * bs]
            )
            hashes.append(h)
            index = i if i < sink_blocks else i - evicted
            if index < sink_blocks and i >= sink_blocks:
                continue  # already evicted: nothing to index
            block = table[index]
            if h not in self.cached and self.hashes[block] is None:
                self.cached[h] = block
                self.hashes[block] = h
