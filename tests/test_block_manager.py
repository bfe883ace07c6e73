"""BlockManager: allocation, prefix caching, copy-on-write and LRU reuse, with no model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm.kv.block_manager as bm_mod
from minillm.kv.block_manager import BlockManager


@dataclass(eq=False)
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def admit(bm: BlockManager, seq: Seq) -> list[int]:
    cached = bm.find_cached_blocks(seq)
    n = len(seq.token_ids) - len(cached) * bm.block_size
    assert bm.can_allocate(seq, cached, n)
    bm.allocate(seq, cached, n)
    seq.num_computed_tokens = len(seq.token_ids)  # as if the model ran
    bm.cache_full_blocks(seq)
    return cached


def test_slots_and_block_count():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Seq(list(range(10)))
    admit(bm, s)
    assert len(s.block_table) == 3  # ceil(10 / 4)
    assert bm.num_free_blocks == 5
    bm.check_invariants([s])
    bm.free_blocks(s)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_prefix_hit_reuses_full_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    admit(bm, a)
    b = Seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 100, 101])
    cached = admit(bm, b)
    assert cached == a.block_table[:2]  # the two full shared blocks
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 10 + 11
    bm.check_invariants([a, b])


def test_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, Seq(list(range(8))))
    again = Seq(list(range(8)))
    assert len(bm.find_cached_blocks(again)) == 1  # not 2: the 8th token's logits are needed


def test_hash_collision_is_caught_by_token_check(monkeypatch):
    monkeypatch.setattr(bm_mod, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, Seq([1, 2, 3, 4, 5]))
    other = Seq([9, 9, 9, 9, 5])
    assert bm.find_cached_blocks(other) == []


def test_freed_blocks_stay_hittable_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Seq([1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free_blocks(a)
    assert bm.find_cached_blocks(Seq([1, 2, 3, 4, 7])) == [0, 1]  # still cached while free
    # a newcomer needing 2 fresh blocks takes the least recently freed first: block 3 (never
    # used), then block 2 (a's tail, freed first); a's prefix blocks 0, 1 survive
    c = Seq([8, 8, 8])
    admit(bm, c)
    assert sorted(c.block_table) == [2, 3]
    assert bm.find_cached_blocks(Seq([1, 2, 3, 4, 7])) == [0, 1]


def test_fork_shares_then_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Seq([1, 2, 3, 4, 5, 6])
    admit(bm, parent)
    child = Seq(list(parent.token_ids))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.ref_counts[b] == 2 for b in parent.block_table)
    # both append one token: the shared partial block (slots 4..7) must be copied once
    parent.token_ids.append(7)
    copies = bm.allocate_slots(parent, 1)
    assert len(copies) == 1 and copies[0][0] == child.block_table[1]
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert parent.block_table[1] != child.block_table[1]
    child.token_ids.append(8)
    assert bm.allocate_slots(child, 1) == []  # now sole owner: no copy
    bm.check_invariants([parent, child])


def test_out_of_blocks_is_reported_not_corrupted():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = Seq(list(range(8)))
    admit(bm, s)
    s.token_ids.append(1)
    s.num_computed_tokens = 8
    assert not bm.can_allocate_slots(s, 1)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate_slots(s, 1)
    bm.check_invariants([s])


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)


# ----------------------------------------------------------------------------- property test
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5]]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "grow", "fork", "free"]), st.integers(0, 2), st.integers(0, 9)
        ),
        max_size=60,
    ),
    st.integers(1, 4),
    st.booleans(),
)
def test_random_interleavings_keep_invariants(ops, block_size, caching):
    bm = BlockManager(num_blocks=24, block_size=block_size, enable_prefix_caching=caching)
    live: list[Seq] = []
    for op, which, extra in ops:
        if op == "add":
            s = Seq(PREFIXES[which] + list(range(100, 100 + extra)))
            cached = bm.find_cached_blocks(s)
            n = len(s.token_ids) - len(cached) * block_size
            if bm.can_allocate(s, cached, n):
                bm.allocate(s, cached, n)
                s.num_computed_tokens = len(s.token_ids)
                bm.cache_full_blocks(s)
                live.append(s)
        elif op == "grow" and live:
            s = live[extra % len(live)]
            s.token_ids.append(extra)
            if bm.can_allocate_slots(s, 1):
                bm.allocate_slots(s, 1)
                s.num_computed_tokens += 1
                bm.cache_full_blocks(s)
            else:
                s.token_ids.pop()
        elif op == "fork" and live:
            p = live[extra % len(live)]
            c = Seq(list(p.token_ids))
            bm.fork(p, c)
            live.append(c)
        elif op == "free" and live:
            bm.free_blocks(live.pop(extra % len(live)))
        bm.check_invariants(live)
        assert bm.num_free_blocks + sum(1 for r in bm.ref_counts if r > 0) == bm.num_blocks
        # every shared full block's content is what each holder thinks it is
        for s in live:
            for i, b in enumerate(s.block_table[: s.num_computed_tokens // block_size]):
                if bm.block_tokens[b] is not None:
                    assert bm.block_tokens[b] == tuple(
                        s.token_ids[i * block_size : (i + 1) * block_size]
                    )
    for s in live:
        bm.free_blocks(s)
    assert bm.num_free_blocks == bm.num_blocks
