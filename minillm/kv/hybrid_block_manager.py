"""A block manager with one block table per KV group: sliding-window groups free old blocks.

vLLM's SlidingWindowManager idea on minillm's pool. Every group (kv/layout.py) draws from the
same free list, so a block a window group gives back can go to any sequence and any group.
Group 0 uses `seq.block_table`; groups 1.. use `seq.group_block_tables`. In a window group,
once the sequence has computed `n` tokens no future query reads a key before position
`n - window + 1`, so every block wholly before it is released and its table entry becomes
NULL_BLOCK (-1): the kernels start at the window's first block and never read it.

Prefix caching stays per group: a block is named by (group, chained hash), because the same
tokens sit in different blocks in each group. A released window block keeps its name in the
LRU free list, as in BlockManager. A prompt hits L blocks only if the global groups hold all L
and each window group holds the blocks its next query still reads (those from
`L*block_size - window + 1` on); the window group's earlier entries are NULL_BLOCK, never
revived. L is the longest length every group agrees on.
"""

from __future__ import annotations

from typing import Protocol

from minillm.kv.block_manager import BlockManager

NULL_BLOCK = -1


class GroupedSequence(Protocol):
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    group_block_tables: list[list[int]]
    block_hashes: list[int]


class GroupHits(list):
    """find_cached_blocks' answer: the hit blocks of group 0 (so len() is the hit length in
    blocks, as the scheduler expects) and `tables`, every group's hit table."""

    tables: list[list[int]]


class HybridBlockManager(BlockManager):
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        group_windows: tuple[int, ...],
        enable_prefix_caching: bool = True,
    ) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        if not group_windows or any(w < 0 for w in group_windows):
            raise ValueError(f"group windows must be >= 0 and at least one, got {group_windows}")
        self.group_windows = tuple(group_windows)
        self.block_group: list[int] = [0] * num_blocks
        self.group_cached: dict[tuple[int, int], int] = {}  # (group, hash) -> block

    # ------------------------------------------------------------------ tables
    def tables(self, seq: GroupedSequence) -> list[list[int]]:
        extra = len(self.group_windows) - 1
        if len(seq.group_block_tables) != extra:
            seq.group_block_tables = [[] for _ in range(extra)]
        return [seq.block_table, *seq.group_block_tables]

    def _set_tables(self, seq: GroupedSequence, tables: list[list[int]]) -> None:
        seq.block_table, seq.group_block_tables = tables[0], tables[1:]

    def first_needed_block(self, group: int, num_computed: int) -> int:
        """Index of the first block a query at position `num_computed` or later still reads."""
        w = self.group_windows[group]
        return max(num_computed - w + 1, 0) // self.block_size if w else 0

    def blocks_held(self, seq: GroupedSequence) -> int:
        """Blocks the sequence's tables hold (shared ones counted once per table)."""
        return sum(b != NULL_BLOCK for t in self.tables(seq) for b in t)

    # ------------------------------------------------------------------ prefix cache
    def _group_hit(self, g: int, hashes: list[int], seq: GroupedSequence, n_blocks: int) -> bool:
        bs = self.block_size
        for i in range(self.first_needed_block(g, n_blocks * bs), n_blocks):
            b = self.group_cached.get((g, hashes[i]))
            if b is None or self.block_tokens[b] != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                return False
        return True

    def find_cached_blocks(self, seq: GroupedSequence) -> GroupHits:  # type: ignore[override]
        hits = GroupHits()
        hits.tables = [[] for _ in self.group_windows]
        if not self.enable_prefix_caching:
            return hits
        bs = self.block_size
        hashes = self._hashes(seq, (len(seq.token_ids) - 1) // bs)
        n = len(hashes)
        while n and not all(self._group_hit(g, hashes, seq, n) for g in range(len(hits.tables))):
            n -= 1
        for g in range(len(hits.tables)):
            first = self.first_needed_block(g, n * bs)
            hits.tables[g] = [NULL_BLOCK] * first + [
                self.group_cached[(g, hashes[i])] for i in range(first, n)
            ]
        hits.extend(hits.tables[0])
        return hits

    def cache_full_blocks(self, seq: GroupedSequence) -> None:
        """Name newly computed full blocks, then release window blocks no query reads again
        (called after every step, once num_computed_tokens has moved on)."""
        if self.enable_prefix_caching:
            bs, n_full = self.block_size, seq.num_computed_tokens // self.block_size
            hashes = self._hashes(seq, n_full)
            for g, table in enumerate(self.tables(seq)):
                for i, h in enumerate(hashes):
                    b = table[i]
                    if b == NULL_BLOCK or self.block_hash[b] is not None:
                        continue
                    if (g, h) not in self.group_cached:
                        self.group_cached[(g, h)] = b
                        self.block_hash[b], self.block_group[b] = h, g
                        self.block_tokens[b] = tuple(seq.token_ids[i * bs : (i + 1) * bs])
        self.release_out_of_window(seq)

    def release_out_of_window(self, seq: GroupedSequence) -> int:
        """Give back the window groups' blocks before the window; returns how many entries."""
        released = 0
        for g, table in enumerate(self.tables(seq)):
            for i in range(min(self.first_needed_block(g, seq.num_computed_tokens), len(table))):
                if table[i] != NULL_BLOCK:
                    self._drop(table[i])
                    table[i] = NULL_BLOCK
                    released += 1
        return released

    # ------------------------------------------------------------------ allocation
    def _drop(self, b: int) -> None:
        self.ref_counts[b] -= 1
        assert self.ref_counts[b] >= 0, f"block {b} freed more often than held"
        if self.ref_counts[b] == 0:
            self.free[b] = None

    def _take_free_block(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:
            key = (self.block_group[b], h)
            if self.group_cached.get(key) == b:
                del self.group_cached[key]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref_counts[b] = 1
        return b

    def _new_blocks_needed(self, seq: GroupedSequence, num_new_tokens: int) -> int:
        bs, n = self.block_size, seq.num_computed_tokens
        need = 0
        for table in self.tables(seq):
            need += max(self.blocks_for(n + num_new_tokens) - len(table), 0)
            if n % bs and table[n // bs] != NULL_BLOCK and self.ref_counts[table[n // bs]] > 1:
                need += 1  # copy-on-write of a shared partial block
        return need

    def can_allocate(
        self, seq: GroupedSequence, cached_blocks: list[int], num_new_tokens: int
    ) -> bool:  # type: ignore[override]
        tables = getattr(cached_blocks, "tables", None) or [[] for _ in self.group_windows]
        held = {b for t in tables for b in t if b != NULL_BLOCK}
        revived = sum(1 for b in held if self.ref_counts[b] == 0)
        hit = len(cached_blocks)
        need = len(tables) * (self.blocks_for(hit * self.block_size + num_new_tokens) - hit)
        return need <= len(self.free) - revived

    def allocate(self, seq: GroupedSequence, cached_blocks: list[int], num_new_tokens: int) -> None:  # type: ignore[override]
        assert not seq.block_table, "sequence already holds blocks"
        tables = getattr(cached_blocks, "tables", None) or [[] for _ in self.group_windows]
        for table in tables:
            for b in table:
                if b == NULL_BLOCK:
                    continue
                if self.ref_counts[b] == 0:
                    del self.free[b]
                self.ref_counts[b] += 1
        self._set_tables(seq, [list(t) for t in tables])
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += seq.num_computed_tokens
        copies = self.allocate_slots(seq, num_new_tokens)
        assert not copies

    def allocate_slots(self, seq: GroupedSequence, num_new_tokens: int) -> list[tuple[int, int]]:
        if not self.can_allocate_slots(seq, num_new_tokens):
            raise RuntimeError("out of KV blocks: check can_allocate_slots first")
        bs, n = self.block_size, seq.num_computed_tokens
        copies = []
        for table in self.tables(seq):
            if n % bs and table[n // bs] != NULL_BLOCK and self.ref_counts[table[n // bs]] > 1:
                old, new = table[n // bs], self._take_free_block()
                self.ref_counts[old] -= 1
                table[n // bs] = new
                copies.append((old, new))
            while len(table) < self.blocks_for(n + num_new_tokens):
                table.append(self._take_free_block())
        return copies

    def fork(self, parent: GroupedSequence, child: GroupedSequence) -> None:  # type: ignore[override]
        tables = [list(t) for t in self.tables(parent)]
        for b in (b for t in tables for b in t if b != NULL_BLOCK):
            self.ref_counts[b] += 1
        self._set_tables(child, tables)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free_blocks(self, seq: GroupedSequence) -> None:  # type: ignore[override]
        for table in self.tables(seq):
            for b in reversed(table):  # tails first: reused before shareable prefixes
                if b != NULL_BLOCK:
                    self._drop(b)
        self._set_tables(seq, [[] for _ in self.group_windows])
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for b in range(self.num_blocks):
            if self.ref_counts[b] == 0:
                self.block_hash[b] = self.block_tokens[b] = None
        self.group_cached = {k: b for k, b in self.group_cached.items() if self.ref_counts[b] > 0}

    def check_invariants(self, live: list[GroupedSequence]) -> None:  # type: ignore[override]
        held = [0] * self.num_blocks
        for s in live:
            for t in self.tables(s):
                for b in t:
                    if b != NULL_BLOCK:
                        held[b] += 1
        assert held == self.ref_counts, "ref counts disagree with the live block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if held[b] == 0}
        for (g, h), b in self.group_cached.items():
            assert self.block_hash[b] == h and self.block_group[b] == g
