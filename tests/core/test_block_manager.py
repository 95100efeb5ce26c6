"""The block manager without a model: example tests, and a hypothesis state machine that drives
it the way the scheduler does (prefix match + acquire, grow, fork, copy-on-write, register,
release / abort in any order) against an independent reference model."""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lamina.kv.block_manager import BlockManager

# ---- examples ------------------------------------------------------------------------------


def test_grow_takes_blocks_in_order_and_counts_them():
    bm = BlockManager(num_blocks=6, block_size=4)
    table: list[int] = []
    bm.grow(table, 1)
    assert table == [0]
    bm.grow(table, 4)  # still fits the first block
    assert table == [0]
    bm.grow(table, 9)
    assert table == [0, 1, 2]
    assert [bm.ref_counts[b] for b in range(6)] == [1, 1, 1, 0, 0, 0]
    assert (bm.num_used_blocks, bm.num_free_blocks) == (3, 3)
    assert bm.peak_used_blocks == 3
    assert bm.can_grow(table, 24)
    assert not bm.can_grow(table, 25)
    assert bm.can_grow(table, 16, extra=2)
    assert not bm.can_grow(table, 16, extra=3)


def test_grow_past_the_pool_raises_and_leaves_the_table_alone():
    bm = BlockManager(num_blocks=3, block_size=2)
    table: list[int] = []
    bm.grow(table, 4)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.grow(table, 7)  # needs 2 more, 1 free
    assert table == [0, 1]
    assert bm.num_free_blocks == 1
    bm.release(table)
    assert table == []
    bm.check_all_free()


def test_ref_counts_follow_forks_and_releases():
    bm = BlockManager(num_blocks=8, block_size=2)
    a: list[int] = []
    bm.grow(a, 5)
    b = bm.fork(a)
    c = bm.fork(b)
    assert a == b == c
    assert b is not a
    assert [bm.ref_counts[x] for x in a] == [3, 3, 3]
    assert bm.num_used_blocks == 3
    bm.release(b)
    assert [bm.ref_counts[x] for x in a] == [2, 2, 2]
    assert bm.num_free_blocks == 5
    bm.release(a)
    assert bm.num_free_blocks == 5  # c still holds them
    bm.release(c)
    bm.check_all_free()
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release([0])


def test_check_all_free_catches_a_leak():
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    bm.grow(table, 3)
    with pytest.raises(AssertionError, match="still referenced"):
        bm.check_all_free()


def test_copy_on_write_gives_the_writer_a_private_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.grow(parent, 6)  # blocks 0, 1; position 5 sits in block 1
    child = bm.fork(parent)
    assert bm.copy_on_write(child, 5) == (1, 2)
    assert child == [0, 2]
    assert parent == [0, 1]
    assert [bm.ref_counts[b] for b in (0, 1, 2)] == [2, 1, 1]
    assert bm.copy_on_write(child, 5) is None  # now private
    assert bm.copy_on_write(parent, 5) is None  # and so is the parent's
    assert bm.copy_on_write(parent, 8) is None  # past the table: nothing to copy
    assert bm.copy_on_write(parent, 1) == (0, 3)  # the shared first block
    assert parent == [3, 1]
    assert child == [0, 2]
    bm.release(parent)
    bm.release(child)
    bm.check_all_free()


def register(bm: BlockManager, table, tokens, salt=None) -> list[int]:
    hashes: list[int] = []
    bm.register_full_blocks(table, hashes, tokens, len(tokens), salt=salt)
    return hashes


def test_prefix_hits_need_whole_equal_prefixes():
    bm = BlockManager(num_blocks=16, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    table: list[int] = []
    bm.grow(table, len(tokens))
    hashes = register(bm, table, tokens)
    assert len(hashes) == 2  # the partial third block is not indexed
    assert bm.match_prefix(tokens, 3) == (table[:2], hashes)
    assert bm.match_prefix(tokens, 1) == (table[:1], hashes[:1])
    assert bm.match_prefix([5, 6, 7, 8], 5) == (table[:2], hashes)
    assert bm.match_prefix([5, 6, 7, 0], 2) == (table[:1], hashes[:1])
    assert bm.match_prefix([0, 6, 7, 8], 2) == ([], [])  # same 2nd block, other prefix
    assert bm.match_prefix([5], 1) == ([], [])  # a partial block never matches
    assert bm.match_prefix(tokens, 0) == ([], [])
    # match_prefix takes no references
    assert [bm.ref_counts[b] for b in table] == [1, 1, 1]


def test_prefix_cache_salt_separates_sequences():
    bm = BlockManager(num_blocks=16, block_size=2)
    tokens = [1, 2, 3, 4]
    plain: list[int] = []
    bm.grow(plain, 4)
    register(bm, plain, tokens)
    salted: list[int] = []
    bm.grow(salted, 4)
    register(bm, salted, tokens, salt=64)
    assert bm.match_prefix(tokens, 2)[0] == plain
    assert bm.match_prefix(tokens, 2, salt=64)[0] == salted
    assert bm.match_prefix(tokens, 2, salt=65) == ([], [])
    assert set(plain).isdisjoint(salted)


def test_prefix_caching_disabled_indexes_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    table: list[int] = []
    bm.grow(table, 4)
    assert register(bm, table, [1, 2, 3, 4]) == []
    assert bm.cached == {}
    assert bm.match_prefix([1, 2, 3, 4], 2) == ([], [])


def test_register_skips_evicted_blocks_but_chains_their_hashes():
    """A retention policy dropped logical blocks 1 and 2 (after one pinned sink block): logical
    block i >= 1 sits at table[i - 2]; the evicted ones are hashed but not indexed."""
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = list(range(10, 20))  # 5 full blocks
    table: list[int] = []
    bm.grow(table, 6)  # live: the sink block and logical blocks 3, 4
    hashes: list[int] = []
    bm.register_full_blocks(table, hashes, tokens, 10, sink_blocks=1, evicted=2)
    assert len(hashes) == 5
    assert bm.cached == {hashes[0]: table[0], hashes[3]: table[1], hashes[4]: table[2]}
    assert bm.match_prefix(tokens, 5) == (table[:1], hashes[:1])  # the chain breaks at 1
    bm.release(table)
    bm.check_all_free()


def test_a_freed_block_stays_cached_until_reused():
    bm = BlockManager(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4]
    table: list[int] = []
    bm.grow(table, 4)
    register(bm, table, tokens)
    first = list(table)
    bm.release(table)
    bm.check_all_free()
    blocks, _ = bm.match_prefix(tokens, 2)
    assert blocks == first  # still findable while free
    for b in blocks:
        bm.acquire(b)  # a cached free block leaves the free pool
    assert bm.num_free_blocks == 1
    assert all(bm.ref_counts[b] == 1 for b in blocks)
    bm.release(blocks)
    other: list[int] = []
    bm.grow(other, 6)  # every block, so the cached ones are handed out and evicted
    assert bm.match_prefix(tokens, 2) == ([], [])
    assert bm.cached == {}
    bm.release(other)
    bm.check_all_free()


def test_free_on_abort_returns_prefix_blocks():
    """A request that took cached prefix blocks and then could not grow gives them back."""
    bm = BlockManager(num_blocks=4, block_size=2)
    owner: list[int] = []
    bm.grow(owner, 4)
    register(bm, owner, [1, 2, 3, 4])
    hog: list[int] = []
    bm.grow(hog, 4)  # the pool is now empty
    blocks, _ = bm.match_prefix([1, 2, 3, 4, 5, 6], 2)
    table: list[int] = []
    for b in blocks:
        bm.acquire(b)
    table.extend(blocks)
    assert not bm.can_grow(table, 6)
    bm.release(table)  # abort
    assert table == []
    assert [bm.ref_counts[b] for b in owner] == [1, 1]
    bm.release(owner)
    bm.release(hog)
    bm.check_all_free()


def test_cached_free_blocks_are_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=1)
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 2)  # blocks 0, 1
    bm.grow(b, 2)  # blocks 2, 3
    register(bm, a, [7, 8])
    register(bm, b, [9, 10])
    bm.release(b)  # freed first: 3 then 2 (a prefix's head goes back last)
    bm.release(a)  # then 1, 0
    assert list(bm.free) == [4, 5, 3, 2, 1, 0]
    fresh: list[int] = []
    bm.grow(fresh, 3)  # the never-used blocks, then the coldest cached one (b's tail)
    assert fresh == [4, 5, 3]
    assert bm.match_prefix([9, 10], 2)[0] == [2]  # b's head survives, its tail is gone
    assert bm.match_prefix([7, 8], 2)[0] == [0, 1]
    bm.acquire(1)  # touching a cached block takes it out of the LRU order ...
    bm.release([1])  # ... and freeing it again makes it the most recent
    assert list(bm.free) == [2, 0, 1]
    bm.grow(fresh, 5)
    assert fresh[3:] == [2, 0]
    bm.release(fresh)
    bm.check_all_free()


# ---- the state machine ---------------------------------------------------------------------

NUM_BLOCKS = 12
BLOCK_SIZE = 2
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # few symbols: many prefix hits
salts = st.sampled_from([None, 3])


class Table:
    """One sequence: its block table, block hashes, tokens (all computed once registered)."""

    def __init__(self, tokens: list[int], salt: int | None) -> None:
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.tokens = list(tokens)
        self.salt = salt


class BlockManagerMachine(RuleBasedStateMachine):
    """The reference model keeps its own ref counts, free order (least recently freed first)
    and content index: (salt, whole token prefix) -> block. Content is tracked by value, not by
    hash, so an index that mixed up prefixes would show."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.tables: dict[int, Table] = {}
        self.next_name = 0
        self.refs = [0] * NUM_BLOCKS
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(NUM_BLOCKS))
        self.index: dict[tuple, int] = {}  # (salt, prefix tokens) -> block
        self.content: dict[int, tuple] = {}  # block -> its key in self.index

    # ---- the model's bookkeeping --------------------------------------------------------
    def _model_take(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.content.pop(block, None)
        if key is not None:
            del self.index[key]
            event("a cached free block is handed out again")
        self.refs[block] = 1
        return block

    def _model_acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def _model_release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def _model_match(self, tokens: list[int], max_blocks: int, salt) -> list[int]:
        out = []
        for i in range(max_blocks):
            block = self.index.get((salt, tuple(tokens[: (i + 1) * BLOCK_SIZE])))
            if block is None or len(tokens) < (i + 1) * BLOCK_SIZE:
                break
            out.append(block)
        return out

    def _grow(self, t: Table, num_tokens: int) -> None:
        need = -(-num_tokens // BLOCK_SIZE) - len(t.blocks)
        expected = [self._model_take() for _ in range(max(need, 0))]
        before = list(t.blocks)
        self.bm.grow(t.blocks, num_tokens)
        assert t.blocks == before + expected  # least recently freed first

    def _register(self, t: Table) -> None:
        first = len(t.hashes)
        self.bm.register_full_blocks(t.blocks, t.hashes, t.tokens, len(t.tokens), salt=t.salt)
        assert len(t.hashes) == len(t.tokens) // BLOCK_SIZE
        for i in range(first, len(t.tokens) // BLOCK_SIZE):
            key = (t.salt, tuple(t.tokens[: (i + 1) * BLOCK_SIZE]))
            block = t.blocks[i]
            if key not in self.index and block not in self.content:
                self.index[key] = block
                self.content[block] = key

    def _pick(self, i: int) -> tuple[int, Table]:
        names = sorted(self.tables)
        name = names[i % len(names)]
        return name, self.tables[name]

    def _holders(self) -> dict[int, int]:
        held: dict[int, int] = defaultdict(int)
        for t in self.tables.values():
            for b in t.blocks:
                held[b] += 1
        return held

    # ---- rules --------------------------------------------------------------------------
    @rule(tokens=tokens_st, salt=salts, cut=st.integers(0, 5), compute=st.booleans())
    def admit(self, tokens, salt, cut, compute):
        """A new request: take its cached prefix, then grow or give the prefix back."""
        t = Table(tokens, salt)
        max_blocks = min(cut, len(tokens) // BLOCK_SIZE)
        blocks, hashes = self.bm.match_prefix(tokens, max_blocks, salt)
        assert blocks == self._model_match(tokens, max_blocks, salt)
        assert len(hashes) == len(blocks)
        event(f"admit: {len(blocks)} prefix blocks hit")
        for b in blocks:
            self.bm.acquire(b)
            self._model_acquire(b)
        t.blocks.extend(blocks)
        t.hashes = list(hashes)
        if not self.bm.can_grow(t.blocks, len(tokens)):
            assert -(-len(tokens) // BLOCK_SIZE) - len(t.blocks) > len(self.free)
            self.bm.release(t.blocks)  # abort before running
            self._model_release(blocks)
            assert t.blocks == []
            event("admit: aborted, no room")
            return
        self._grow(t, len(tokens))
        self.tables[self.next_name] = t
        self.next_name += 1
        if compute:
            self._register(t)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 50))
    def compute(self, i):
        """The pending prompt tokens of a table are computed: index its full blocks."""
        _, t = self._pick(i)
        self._register(t)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 50), token=st.integers(0, 2))
    def append(self, i, token):
        """Decode one token: copy-on-write the block it lands in, grow, compute, index."""
        _, t = self._pick(i)
        self._register(t)  # what came before is computed
        pos = len(t.tokens)
        idx = pos // BLOCK_SIZE
        need_copy = idx < len(t.blocks) and self.refs[t.blocks[idx]] > 1
        new_blocks = -(-(pos + 1) // BLOCK_SIZE) - len(t.blocks)
        if not self.bm.can_grow(t.blocks, pos + 1, int(need_copy)):
            assert new_blocks + int(need_copy) > len(self.free)
            event("append: no room")
            return
        self._cow(t, pos)
        self._grow(t, pos + 1)
        t.tokens.append(token)
        self._register(t)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 50))
    def fork(self, i):
        _, t = self._pick(i)
        child = Table(t.tokens, t.salt)
        child.blocks = self.bm.fork(t.blocks)
        assert child.blocks == t.blocks
        assert child.blocks is not t.blocks
        child.hashes = list(t.hashes)
        for b in child.blocks:
            self.refs[b] += 1
        self.tables[self.next_name] = child
        self.next_name += 1

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 50), pos=st.integers(0, 20))
    def copy_on_write(self, i, pos):
        _, t = self._pick(i)
        self._cow(t, pos)

    def _cow(self, t: Table, pos: int) -> None:
        idx = pos // BLOCK_SIZE
        others = {id(o): list(o.blocks) for o in self.tables.values() if o is not t}
        before = list(t.blocks)
        shared = idx < len(before) and self.refs[before[idx]] > 1
        if shared and not self.free:
            return  # the scheduler checks can_grow(..., extra=1) first
        result = self.bm.copy_on_write(t.blocks, pos)
        if not shared:
            assert result is None
            assert t.blocks == before
            return
        event("copy-on-write copied a shared block")
        src = before[idx]
        self.refs[src] -= 1
        dst = self._model_take()
        assert result == (src, dst)
        assert t.blocks == [*before[:idx], dst, *before[idx + 1 :]]
        assert self.bm.ref_counts[dst] == 1
        assert self.bm.ref_counts[src] >= 1
        assert {id(o): o.blocks for o in self.tables.values() if o is not t} == others
        assert sum(dst in o.blocks for o in self.tables.values()) == 1

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 50))
    def release(self, i):
        """A finished or aborted sequence (in any order) gives its blocks back."""
        name, t = self._pick(i)
        blocks = list(t.blocks)
        self.bm.release(t.blocks)
        self._model_release(blocks)
        assert t.blocks == []
        del self.tables[name]

    @rule(tokens=tokens_st, salt=salts, cut=st.integers(0, 5))
    def match(self, tokens, salt, cut):
        """match_prefix returns exactly the blocks registered for each whole prefix."""
        max_blocks = min(cut, len(tokens) // BLOCK_SIZE + 1)
        refs = list(self.bm.ref_counts)
        blocks, hashes = self.bm.match_prefix(tokens, max_blocks, salt)
        assert blocks == self._model_match(tokens, max_blocks, salt)
        assert len(hashes) == len(blocks)
        assert len(set(blocks)) == len(blocks)
        for i, b in enumerate(blocks):
            assert self.content[b] == (salt, tuple(tokens[: (i + 1) * BLOCK_SIZE]))
            assert self.bm.hashes[b] == hashes[i]
        assert self.bm.ref_counts == refs  # no references taken

    # ---- invariants ---------------------------------------------------------------------
    @invariant()
    def ref_counts_equal_holders(self):
        held = self._holders()
        assert self.bm.ref_counts == [held.get(b, 0) for b in range(NUM_BLOCKS)]
        assert self.bm.ref_counts == self.refs
        for t in self.tables.values():
            assert len(set(t.blocks)) == len(t.blocks)  # never twice in one table

    @invariant()
    def free_pool_is_the_unreferenced_blocks_in_lru_order(self):
        free = list(self.bm.free)
        assert len(set(free)) == len(free)
        assert set(free) == {b for b in range(NUM_BLOCKS) if self.bm.ref_counts[b] == 0}
        assert set(free).isdisjoint(self._holders())
        assert free == list(self.free)
        assert self.bm.num_used_blocks + self.bm.num_free_blocks == NUM_BLOCKS
        assert self.bm.num_used_blocks == sum(c > 0 for c in self.bm.ref_counts)

    @invariant()
    def index_holds_exactly_the_registered_content(self):
        assert set(self.bm.cached.values()) == set(self.content)
        for h, b in self.bm.cached.items():
            assert self.bm.hashes[b] == h
        hashed = {b for b in range(NUM_BLOCKS) if self.bm.hashes[b] is not None}
        assert hashed == set(self.content)
        for t in self.tables.values():  # a table's indexed blocks hold its own prefix
            for i, b in enumerate(t.blocks[: len(t.hashes)]):
                key = self.content.get(b)
                assert key is None or key == (t.salt, tuple(t.tokens[: (i + 1) * BLOCK_SIZE]))

    def teardown(self):
        """Every table released, in random order by now: nothing may leak."""
        for t in self.tables.values():
            self.bm.release(t.blocks)
        self.bm.check_all_free()
        assert self.bm.num_free_blocks == NUM_BLOCKS


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
