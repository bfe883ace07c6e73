"""Numba kernels for the paged KV cache: store K/V in place, and attend through block tables.

The cache is (num_blocks, block_size, KvH, D). A sequence's keys live in the blocks its block
table lists, so attention walks the table and reads each block where it is (no gather copy).
Softmax is computed online, one cache block at a time: keep the running max m, the running
sum l of exp(score - m) and the running weighted sum of V; when a block raises the max, rescale
l and the sum by exp(m_old - m_new). One pass, no (context_len,) score array, no overflow.

A sliding window (Gemma 3's local layers; ``window`` > 0) starts the walk at the block of the
first key in the window, so blocks before it are never read: they may already be freed and
handed to another sequence (kv/block_manager.py). ``window`` = 0 is the whole context.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import FASTMATH, exp_f32


@njit(nogil=True, cache=True)
def store_kv_slots(k, v, k_cache, v_cache, slot_mapping):  # noqa: ANN001, ANN201
    """k/v (T, KvH, D) -> the caches at slot = block * block_size + offset, in place."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    for t in range(slot_mapping.shape[0]):
        slot = slot_mapping[t]
        if slot < 0 or slot >= nb * bs:
            raise ValueError("store_kv: slot_mapping holds a slot outside the KV cache")
        k_cache[slot // bs, slot % bs] = k[t]
        v_cache[slot // bs, slot % bs] = v[t]


@njit(nogil=True, cache=True)
def _check_tables(tables, lengths, num_blocks, block_size):  # noqa: ANN001, ANN202
    """Every block a sequence reads must exist: Numba does not bounds-check indexing."""
    for b in range(tables.shape[0]):
        n = lengths[b]
        if n < 1 or n > tables.shape[1] * block_size:
            raise ValueError("attention: a context length is < 1 or longer than its block table")
        for i in range((n + block_size - 1) // block_size):
            if tables[b, i] < 0 or tables[b, i] >= num_blocks:
                raise ValueError("attention: a block table names a block outside the KV cache")


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _attend_one(q, k_cache, v_cache, table, first, length, kv_head, scale, out, scores, acc):  # noqa: ANN001, ANN202, PLR0913
    """out (D,) = softmax(q . K[first:length] * scale) @ V[first:length] for one query head.
    scores (block_size,) and acc (D,) are scratch space, reused across calls."""
    bs = k_cache.shape[1]
    d = q.shape[0]
    acc[:] = 0
    run_max = -np.inf
    run_sum = np.float32(0)
    for i in range(first // bs, (length + bs - 1) // bs):
        blk = table[i]
        s0 = max(first - i * bs, 0)  # > 0 only in the window's first block
        n = min(bs, length - i * bs)
        blk_max = -np.inf
        for s in range(s0, n):
            dot = np.float32(0)
            for j in range(d):
                dot += q[j] * k_cache[blk, s, kv_head, j]
            scores[s] = dot * scale
            blk_max = max(blk_max, scores[s])
        new_max = max(run_max, blk_max)
        rescale = np.float32(np.exp(run_max - new_max))  # exp(-inf) = 0 on the first block
        run_sum *= rescale
        for j in range(d):
            acc[j] *= rescale
        for s in range(s0, n):  # the block's exps together: this vectorizes (np.exp would not)
            scores[s] = exp_f32(scores[s] - np.float32(new_max))
        for s in range(s0, n):
            p = scores[s]
            run_sum += p
            for j in range(d):
                acc[j] += p * v_cache[blk, s, kv_head, j]
        run_max = new_max
    inv = np.float32(1) / run_sum
    for j in range(d):
        out[j] = acc[j] * inv


RUNS = 32  # paged_decode's work items: enough to balance the threads of most CPUs


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window, out):  # noqa: ANN001, ANN201
    """q (B, H, D): one new token per sequence, attending to its last `window` positions (0:
    all); out (B, H, D). The B x H query heads are split
    into a few runs of consecutive heads (heads sharing a KV head read its blocks from cache),
    and each run allocates its scratch space once."""
    b_rows, h_count = q.shape[0], q.shape[1]
    group = h_count // k_cache.shape[2]  # query heads per KV head (GQA)
    _check_tables(block_tables, context_lens, k_cache.shape[0], k_cache.shape[1])
    items = b_rows * h_count
    runs = min(items, RUNS)
    per_run = -(-items // runs)
    for run in prange(runs):
        scores = np.empty(k_cache.shape[1], np.float32)
        acc = np.empty(q.shape[2], np.float32)
        for item in range(run * per_run, min(items, run * per_run + per_run)):
            b, h = item // h_count, item % h_count
            length = context_lens[b]
            first = max(length - window, 0) if window > 0 else 0
            _attend_one(
                q[b, h], k_cache, v_cache, block_tables[b], first, length, h // group,
                np.float32(scale), out[b, h], scores, acc,
            )  # fmt: skip


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def paged_prefill(q, k_cache, v_cache, block_table, context_len, scale, window, out):  # noqa: ANN001, ANN201
    """Causal attention for n new tokens at the end of a context_len context, each seeing its
    last `window` positions (0: all); q/out (n, H, D)."""
    n, h_count = q.shape[0], q.shape[1]
    group = h_count // k_cache.shape[2]
    _check_tables(
        block_table.reshape(1, -1),
        np.full(1, context_len, np.int64),
        k_cache.shape[0],
        k_cache.shape[1],
    )
    for item in prange(n * h_count):
        # later tokens see more keys: alternate short and long ones so that the contiguous item
        # ranges prange gives each thread carry about the same work
        r, h = item // h_count, item % h_count
        i = r // 2 if r % 2 == 0 else n - 1 - r // 2
        scores = np.empty(k_cache.shape[1], np.float32)
        acc = np.empty(q.shape[2], np.float32)
        length = context_len - n + i + 1
        first = max(length - window, 0) if window > 0 else 0
        _attend_one(
            q[i, h], k_cache, v_cache, block_table, first, length, h // group,
            np.float32(scale), out[i, h], scores, acc,
        )  # fmt: skip
