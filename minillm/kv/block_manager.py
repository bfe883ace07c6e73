"""The paged-KV allocator: fixed-size blocks, reference counts, prefix caching, copy-on-write.

Pure Python and model-free. A sequence owns a *block table* (list of block ids); slot ``p`` of
the sequence lives at ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching: once a block is full, it is named by a chained hash of its tokens and of the
hash of the block before it, so equal hashes mean equal *prefixes*, not just equal blocks. A
later sequence whose prompt starts with the same full blocks reuses them (after checking the
tokens really are equal). Freed blocks keep their hash and sit in an LRU free list, so they can
still be hit until they are handed out again.

Sharing: several sequences may hold one block (ref count > 1). Full blocks are never written
again, so sharing them is free; a shared *partial* last block (after ``fork`` for parallel
sampling) is copied before it is written (copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class SequenceLike(Protocol):
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]  # chained hashes of the sequence's full blocks, computed lazily


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _hashes(self, seq: SequenceLike, num_full_blocks: int) -> list[int]:
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(
                chain_hash(
                    hashes[-1] if hashes else None, tuple(seq.token_ids[i * bs : (i + 1) * bs])
                )
            )
        return hashes[:num_full_blocks]

    def find_cached_blocks(self, seq: SequenceLike) -> list[int]:
        """Leading full blocks of `seq` already in the cache. At least one token is always left
        to compute, because the last prompt token's logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found = []
        for i, h in enumerate(self._hashes(seq, (len(seq.token_ids) - 1) // bs)):
            b = self.cached.get(h)
            if b is None or self.block_tokens[b] != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break  # a miss, or a hash collision caught by the token check
            found.append(b)
        return found

    def cache_full_blocks(self, seq: SequenceLike) -> None:
        """Name the sequence's newly computed full blocks so later prompts can hit them."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        for i, h in enumerate(self._hashes(seq, n_full)):
            b = seq.block_table[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.cached[h] = b
                self.block_hash[b] = h
                self.block_tokens[b] = tuple(
                    seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
                )

    # ------------------------------------------------------------------ allocation
    def _take_free_block(self) -> int:
        b, _ = self.free.popitem(last=False)  # least recently freed first
        h = self.block_hash[b]
        if h is not None:  # evict its cache entry: its contents are about to be overwritten
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref_counts[b] = 1
        return b

    def _new_blocks_needed(self, seq: SequenceLike, num_new_tokens: int) -> int:
        bs, n = self.block_size, seq.num_computed_tokens
        need = self.blocks_for(n + num_new_tokens) - len(seq.block_table)
        if n % bs and self.ref_counts[seq.block_table[n // bs]] > 1:
            need += 1  # the shared partial block must be copied before we write into it
        return max(need, 0)

    def can_allocate(
        self, seq: SequenceLike, cached_blocks: list[int], num_new_tokens: int
    ) -> bool:
        """Room to admit a waiting sequence: its cache hits plus num_new_tokens new slots."""
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        total = self.blocks_for(len(cached_blocks) * self.block_size + num_new_tokens)
        return total - len(cached_blocks) <= len(self.free) - revived

    def allocate(self, seq: SequenceLike, cached_blocks: list[int], num_new_tokens: int) -> None:
        """Admit a waiting sequence: take its cached prefix, then slots for num_new_tokens."""
        assert not seq.block_table, "sequence already holds blocks"
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        if self.enable_prefix_caching:
            # count once per admission, over the tokens that could have hit
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += seq.num_computed_tokens
        copies = self.allocate_slots(seq, num_new_tokens)
        assert not copies

    def can_allocate_slots(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        return self._new_blocks_needed(seq, num_new_tokens) <= len(self.free)

    def allocate_slots(self, seq: SequenceLike, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make slots [num_computed, num_computed + n) writable; returns (src, dst) block copies."""
        if not self.can_allocate_slots(seq, num_new_tokens):
            raise RuntimeError("out of KV blocks: check can_allocate_slots first")
        bs, n = self.block_size, seq.num_computed_tokens
        copies = []
        if n % bs:
            i = n // bs
            old = seq.block_table[i]
            if self.ref_counts[old] > 1:  # copy-on-write of a shared partial block
                new = self._take_free_block()
                self.ref_counts[old] -= 1
                seq.block_table[i] = new
                copies.append((old, new))
        while len(seq.block_table) < self.blocks_for(n + num_new_tokens):
            seq.block_table.append(self._take_free_block())
        return copies

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        """Let `child` share all of `parent`'s blocks (parallel sampling, n > 1)."""
        for b in parent.block_table:
            self.ref_counts[b] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free_blocks(self, seq: SequenceLike) -> None:
        """Release a finished, aborted or preempted sequence's blocks.

        Tail blocks are released first so that, in LRU order, they are reused before the
        prefix blocks that other prompts are more likely to share."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed more often than held"
            if self.ref_counts[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for b in range(self.num_blocks):
            if self.ref_counts[b] == 0:
                self.block_hash[b] = self.block_tokens[b] = None
        self.cached = {h: b for h, b in self.cached.items() if self.ref_counts[b] > 0}

    def check_invariants(self, live: list[SequenceLike]) -> None:
        """free + used = total, and every ref count equals the number of tables holding it."""
        held = [0] * self.num_blocks
        for s in live:
            for b in s.block_table:
                held[b] += 1
        assert held == self.ref_counts, "ref counts disagree with the live block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if held[b] == 0}
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
