"""KV groups (kv/layout.py) and the hybrid block manager: window groups free old blocks.

Pure accounting, no model: blocks held per sequence against the formula, freed blocks reused by
another sequence, prefix hits that never revive a released window block, ref counts consistent
after random admissions, steps, forks and frees."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from minillm.kv.block_manager import BlockManager
from minillm.kv.hybrid_block_manager import NULL_BLOCK, HybridBlockManager
from minillm.kv.layout import layout_for_windows, single_group

BS, W = 4, 10  # block size, window


@dataclass(eq=False)
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    group_block_tables: list[list[int]] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def gemma_windows(num_layers: int = 18, every: int = 6, window: int = 512) -> list[int]:
    return [0 if (i + 1) % every == 0 else window for i in range(num_layers)]


def test_layout_groups_gemma_layers_into_equal_pages():
    lay = layout_for_windows(gemma_windows())
    assert lay.page_layers == 3 and lay.group_windows == (0, 512, 512, 512, 512, 512)
    assert [i for i, g in enumerate(lay.layer_group) if g == 0] == [5, 11, 17]
    for g in range(lay.num_groups):  # each group: one layer on each of the three arrays
        arrays = sorted(a for a, x in zip(lay.layer_array, lay.layer_group, strict=True) if x == g)
        assert arrays == [0, 1, 2]
    assert single_group(30) == layout_for_windows([0] * 30)
    assert single_group(4).layer_array == (0, 1, 2, 3)


def run(bm: HybridBlockManager, seq: Seq, chunk: int, until: int) -> None:
    """Admit `seq` and compute it `chunk` tokens a step (then one a step) up to `until` tokens."""
    cached = bm.find_cached_blocks(seq)
    n = min(len(seq.token_ids) - len(cached) * BS, chunk)
    bm.allocate(seq, cached, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)
    while seq.num_computed_tokens < until:
        if seq.num_computed_tokens == len(seq.token_ids):
            seq.token_ids.append(1000 + len(seq.token_ids))  # a sampled token
        n = min(chunk, len(seq.token_ids) - seq.num_computed_tokens)
        bm.allocate_slots(seq, n)
        seq.num_computed_tokens += n
        bm.cache_full_blocks(seq)


def held_formula(n: int, groups: tuple[int, ...]) -> int:
    """Blocks a sequence with n computed tokens holds: all of them in a global group, in a
    window group only those from the block of position n - window + 1 on."""
    total = -(-n // BS)
    return sum(total - (max(n - w + 1, 0) // BS if w else 0) for w in groups)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
@pytest.mark.parametrize("n", [1, 9, 10, 11, 24, 37])
def test_blocks_held_match_the_formula(n, chunk):
    groups = (0, W, W)
    bm = HybridBlockManager(64, BS, groups)
    s = Seq(list(range(min(n, 30))))
    run(bm, s, chunk, n)
    assert bm.blocks_held(s) == held_formula(n, groups)
    assert bm.num_free_blocks == 64 - held_formula(n, groups)
    bm.check_invariants([s])
    # what a window layer will read is still held: the block of position n - W + 1 onwards
    for t in s.group_block_tables:
        first = max(n - W + 1, 0) // BS
        assert NULL_BLOCK not in t[first:] and set(t[:first]) <= {NULL_BLOCK}
    bm.free_blocks(s)
    assert bm.num_free_blocks == 64
    bm.check_invariants([])


def test_without_freeing_every_group_holds_every_block():
    bm = HybridBlockManager(64, BS, (0, 0, 0))
    s = Seq(list(range(30)))
    run(bm, s, 8, 30)
    assert bm.blocks_held(s) == 3 * -(-30 // BS)


def test_released_window_blocks_go_to_another_sequence():
    """A pool that holds one long sequence's global blocks plus its windows, and a second
    sequence only thanks to the blocks the first one's window groups gave back."""
    groups = (0, W)
    a = Seq(list(range(40)))
    full = 2 * -(-40 // BS)  # 20: what a would hold without freeing
    bm = HybridBlockManager(full, BS, groups)
    run(bm, a, 4, 40)
    released = {b for b in range(full) if bm.ref_counts[b] == 0}
    assert len(released) == full - held_formula(40, groups) > 0
    b = Seq([7] * 12)  # needs 2 x 3 blocks
    cached = bm.find_cached_blocks(b)
    assert bm.can_allocate(b, cached, 12)
    bm.allocate(b, cached, 12)
    assert set(b.block_table + b.group_block_tables[0]) <= released
    bm.check_invariants([a, b])
    # the same bytes as one table for every layer (a block then covers both groups' layers)
    # cannot take b
    plain = BlockManager(full // len(groups), BS)
    a2 = Seq(list(range(40)))
    plain.allocate(a2, [], 40)
    assert not plain.can_allocate(Seq([7] * 12), [], 12)


def test_prefix_hit_takes_only_the_window_blocks_the_next_query_reads():
    """A released window block keeps its name until it is handed out again (as in vLLM), so
    it may be hit; blocks before the hit's window are NULL, never taken."""
    groups = (0, W)
    bm = HybridBlockManager(64, BS, groups)
    a = Seq(list(range(30)))
    run(bm, a, 30, 30)
    a_tables = [list(a.block_table), list(a.group_block_tables[0])]
    bm.free_blocks(a)
    b = Seq(list(range(30)) + [99])
    hits = bm.find_cached_blocks(b)
    assert len(hits) == 7  # (31 - 1) // 4 full blocks, all still named
    assert hits.tables[0] == a_tables[0][:7]
    first = max(7 * BS - W + 1, 0) // BS
    assert hits.tables[1][:first] == [NULL_BLOCK] * first
    assert hits.tables[1][5:] == a_tables[1][5:7]  # still held by a when it was freed
    assert NULL_BLOCK not in hits.tables[1][first:]  # block 4: released by a, name kept
    bm.allocate(b, hits, len(b.token_ids) - 7 * BS)
    bm.check_invariants([b])
    for t in [b.block_table, *b.group_block_tables]:  # every held block holds b's tokens
        for i, blk in enumerate(t[:7]):
            if blk != NULL_BLOCK:
                assert bm.block_tokens[blk] == tuple(b.token_ids[i * BS : (i + 1) * BS])


def test_prefix_hit_needs_the_window_blocks_not_the_whole_prefix():
    """The global group still holds every block; the window group's released blocks were
    handed out again. A prompt whose window tail is still named hits in full; one whose window
    falls on reused blocks hits nothing, though its global prefix is all there."""
    bm = HybridBlockManager(40, BS, (0, W))
    a = Seq(list(range(40)))
    run(bm, a, 40, 40)  # holds 10 global + 3 window blocks; window blocks 0..6 released
    filler = Seq([5] * 13 * BS)  # 26 blocks: the 20 never used, then 6 of a's released ones
    bm.allocate(filler, [], len(filler.token_ids))
    bm.check_invariants([a, filler])
    full = bm.find_cached_blocks(Seq(list(range(40)) + [1]))
    assert len(full) == 10 and full.tables[1][7:] == a.group_block_tables[0][7:]
    assert full.tables[1][:7] == [NULL_BLOCK] * 7
    short = Seq(list(range(28)) + [1])  # its window (blocks 4..6) was handed out
    assert len(bm.find_cached_blocks(short)) == 0


def test_random_admissions_steps_forks_and_frees_keep_ref_counts_consistent():
    rng = random.Random(0)
    bm = HybridBlockManager(120, BS, (0, W, W))
    live: list[Seq] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            s = Seq([rng.randrange(3) for _ in range(rng.randrange(1, 30))])
            hits = bm.find_cached_blocks(s)
            n = len(s.token_ids) - len(hits) * BS
            if bm.can_allocate(s, hits, n):
                bm.allocate(s, hits, n)
                s.num_computed_tokens = len(s.token_ids)
                bm.cache_full_blocks(s)
                live.append(s)
        elif op < 0.75:
            s = rng.choice(live)
            s.token_ids.append(rng.randrange(3))
            if bm.can_allocate_slots(s, 1):
                bm.allocate_slots(s, 1)
                s.num_computed_tokens += 1
                bm.cache_full_blocks(s)
            else:
                s.token_ids.pop()
        elif op < 0.85:
            child = Seq(list(rng.choice(live).token_ids))
            bm.fork(next(x for x in live if x.token_ids == child.token_ids), child)
            live.append(child)
        else:
            bm.free_blocks(live.pop(rng.randrange(len(live))))
        bm.check_invariants(live)
        for s in live:
            assert bm.blocks_held(s) <= held_formula(s.num_computed_tokens, (0, W, W))
