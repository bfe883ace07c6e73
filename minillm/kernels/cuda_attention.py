"""numba.cuda kernels for attention over the paged KV cache.

Both kernels read keys and values *in place* through block tables: position p of a sequence
lives at block ``table[p // BS]``, offset ``p % BS`` of the cache (NB, BS, KvH, D). Both use
the online softmax (keep a running max m, a running sum l and a running weighted sum of values,
rescaling them by exp(m_old - m_new) when the max grows), so a score is computed once and never
stored: memory stays O(D) per query whatever the context length.

Where the parallelism comes from differs, and that is the lesson:

- **decode** has one query per (sequence, head): there is nothing to split but the keys. A
  block owns one (sequence, head); its threads take a tile of keys each (thread i: key
  start + i), each keeps its own partial softmax (m, l, acc[D]), and at the end the block
  merges the partials in a tree of log2(threads) steps. This is "split-K" inside a block, the
  idea behind FlashDecoding.
- **prefill** has many queries: a block owns a tile of `threads` queries of one head, one
  query per thread, and walks the keys tile by tile. Each K/V tile is loaded into shared memory
  once and used by every query of the block (reuse, as in the tiled matmul), and no merge is
  needed. This is FlashAttention's loop, kept simple.

K/V tiles are loaded cooperatively: consecutive threads read consecutive elements of a key's
D contiguous floats (coalesced). With GQA, the H / KvH query heads of a group read the same
K/V; a GPU serves the repeats from its L2 cache.

Shared memory per block is 2 * threads * D * 4 bytes (32 KiB for 32 threads and D = 128),
under the 48 KiB a block may take by default. The per-thread arrays acc[D] (and q[D] in
prefill) live in registers: ptxas reports 137 registers per thread for decode and 199 for
prefill at D = 64 on sm_80, no spills. Registers, not threads, then cap how many blocks an SM
runs at once (occupancy): 65536 / (137 * 32) = 14 decode blocks per SM.

The kernel bodies read the module-global ``cuda`` (see cuda_linear.py for why).
"""

from __future__ import annotations

import functools
import math

from numba import cuda, float32

from minillm.kernels.cuda_linear import check_power_of_two


@functools.cache
def make_paged_decode_attention(threads: int, head_dim: int):  # noqa: ANN201 - a cuda kernel
    """out (B, H, D): one query per sequence against its context_lens[b] cached keys.

    q (B, H, D); k_cache, v_cache (NB, BS, KvH, D); block_tables (B, M); context_lens (B,).
    Launch with `threads` threads per block; work item w = b * H + h.
    """
    check_power_of_two("threads", threads)
    dim = head_dim

    def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out):
        tid = cuda.threadIdx.x
        k_tile = cuda.shared.array((threads, dim), float32)  # reused as the merge buffer
        v_tile = cuda.shared.array((threads, dim), float32)
        q_shared = cuda.shared.array(dim, float32)
        m_shared = cuda.shared.array(threads, float32)
        l_shared = cuda.shared.array(threads, float32)
        acc = cuda.local.array(dim, float32)
        n_seq, n_head = q.shape[0], q.shape[1]
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        group = n_head // n_kv  # query heads per KV head (GQA)
        for work in range(cuda.blockIdx.x, n_seq * n_head, cuda.gridDim.x):
            b = work // n_head
            h = work % n_head
            kv_head = h // group
            ctx = context_lens[b]
            for d in range(tid, dim, threads):
                q_shared[d] = q[b, h, d] * scale  # scale once here, not once per key
            m = float32(-math.inf)
            l_sum = float32(0.0)
            for d in range(dim):
                acc[d] = float32(0.0)
            for start in range(0, ctx, threads):
                cuda.syncthreads()  # q_shared written / the previous tile consumed
                for i in range(tid, threads * dim, threads):  # coalesced: i -> (key, d)
                    pos = start + i // dim
                    if pos < ctx:
                        blk = block_tables[b, pos // block_size]
                        off = pos % block_size
                        k_tile[i // dim, i % dim] = k_cache[blk, off, kv_head, i % dim]
                        v_tile[i // dim, i % dim] = v_cache[blk, off, kv_head, i % dim]
                cuda.syncthreads()
                if start + tid < ctx:  # this thread's key: score, then online softmax update
                    s = float32(0.0)
                    for d in range(dim):
                        s += q_shared[d] * k_tile[tid, d]
                    m_new = max(m, s)
                    rescale = math.exp(m - m_new)
                    p = math.exp(s - m_new)
                    l_sum = l_sum * rescale + p
                    for d in range(dim):
                        acc[d] = acc[d] * rescale + p * v_tile[tid, d]
                    m = m_new
            # ---- merge the per-thread partial softmaxes, pairwise, in a tree
            cuda.syncthreads()
            m_shared[tid] = m
            l_shared[tid] = l_sum
            for d in range(dim):
                k_tile[tid, d] = acc[d]
            cuda.syncthreads()
            half = threads // 2
            while half > 0:
                if tid < half and m_shared[tid + half] > float32(-math.inf):
                    m_a = m_shared[tid]
                    m_b = m_shared[tid + half]
                    m_new = max(m_a, m_b)
                    scale_a = math.exp(m_a - m_new)
                    scale_b = math.exp(m_b - m_new)
                    l_shared[tid] = l_shared[tid] * scale_a + l_shared[tid + half] * scale_b
                    m_shared[tid] = m_new
                    for d in range(dim):
                        k_tile[tid, d] = k_tile[tid, d] * scale_a + k_tile[tid + half, d] * scale_b
                cuda.syncthreads()
                half //= 2
            for d in range(tid, dim, threads):
                out[b, h, d] = k_tile[0, d] / l_shared[0]
            cuda.syncthreads()  # the result is read before the next item reuses k_tile

    return cuda.jit(paged_decode_attention)


@functools.cache
def make_paged_prefill_attention(threads: int, head_dim: int):  # noqa: ANN201 - a cuda kernel
    """out (n, H, D): causal attention of one sequence's n new tokens, the last n of its context.

    q (n, H, D); caches (NB, BS, KvH, D); block_table (M,). Query i sits at position
    context_len - n + i and sees keys 0..that position. Launch with `threads` threads per
    block; work item w = query tile * H + h, one query per thread.
    """
    check_power_of_two("threads", threads)
    dim = head_dim

    def paged_prefill_attention(q, k_cache, v_cache, block_table, context_len, scale, out):
        tid = cuda.threadIdx.x
        k_tile = cuda.shared.array((threads, dim), float32)
        v_tile = cuda.shared.array((threads, dim), float32)
        q_reg = cuda.local.array(dim, float32)
        acc = cuda.local.array(dim, float32)
        n_new, n_head = q.shape[0], q.shape[1]
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        group = n_head // n_kv
        first_pos = context_len - n_new  # position of query 0
        n_tiles = (n_new + threads - 1) // threads
        for work in range(cuda.blockIdx.x, n_tiles * n_head, cuda.gridDim.x):
            h = work % n_head
            kv_head = h // group
            q0 = (work // n_head) * threads
            i = q0 + tid  # this thread's query
            my_pos = first_pos + i
            if i < n_new:
                for d in range(dim):
                    q_reg[d] = q[i, h, d] * scale
            m = float32(-math.inf)
            l_sum = float32(0.0)
            for d in range(dim):
                acc[d] = float32(0.0)
            # the block's last query decides how far every thread of the block must walk
            end = min(context_len, first_pos + q0 + threads)
            for start in range(0, end, threads):
                cuda.syncthreads()  # the previous tile consumed
                for e in range(tid, threads * dim, threads):
                    pos = start + e // dim
                    if pos < end:
                        blk = block_table[pos // block_size]
                        off = pos % block_size
                        k_tile[e // dim, e % dim] = k_cache[blk, off, kv_head, e % dim]
                        v_tile[e // dim, e % dim] = v_cache[blk, off, kv_head, e % dim]
                cuda.syncthreads()
                if i < n_new:
                    for r in range(min(threads, my_pos + 1 - start)):  # causal: keys <= my_pos
                        s = float32(0.0)
                        for d in range(dim):
                            s += q_reg[d] * k_tile[r, d]  # same address for all: a broadcast
                        m_new = max(m, s)
                        rescale = math.exp(m - m_new)
                        p = math.exp(s - m_new)
                        l_sum = l_sum * rescale + p
                        for d in range(dim):
                            acc[d] = acc[d] * rescale + p * v_tile[r, d]
                        m = m_new
            if i < n_new:
                for d in range(dim):
                    out[i, h, d] = acc[d] / l_sum

    return cuda.jit(paged_prefill_attention)
