"""numba.cuda kernels that each do one part of a decoder layer: the resident path's launches.

Op by op, a layer is ~15 launches, and every intermediate (the normed row, q, k, v, gate, up)
makes a round trip through global memory. Fused, a layer is six launches:

1. ``qkv``: RMSNorm + the q, k and v projections (three weights, one grid over all their rows)
2. ``rope_store``: RoPE on q and k, and k, v written to their paged-cache slots
3. paged attention (``cuda_attention``)
4. ``cuda_linear.make_matvec(accumulate=True)``: the o projection, added into the residual
   stream in place
5. ``glu``: RMSNorm + gate and up + SiLU(gate) * up (the same row of both, in one warp)
6. ``make_matvec(accumulate=True)`` again: the down projection, added in place

and the step adds ``rope_table`` (cos/sin of every position, once for all layers), the
embedding, and ``norm_matvec`` (final RMSNorm + lm_head on just the rows to sample).

The norm is fused the way llama.cpp's and vLLM's fused-norm kernels do it: a block first stages
its token's row of x in shared memory, reduces its sum of squares, scales the staged row, and
then every warp reads x from shared memory while it streams its weight rows from global
memory. Each block recomputes the norm of its token (d multiply-adds, from L2), which is cheap
next to the weight bytes it streams. The matvec layout is ``cuda_linear.make_matvec``'s: a
block of (lanes, rows_per_block) threads, each row slot a warp whose lanes sweep the row's
GGUF blocks and fold their partial sums in a tree.

Resources (ptxas -v, sm_90, Q4_1 weights, d = 576, 32 lanes x 4 row slots): qkv 80 registers
and 3.3 KiB of shared memory per block, glu 78, norm_matvec 79, rope_store 32,
no spills. At 80 registers a 128-thread block takes 10,240 of an SM's 65,536, so 6 blocks
(24 warps) fit per SM at once.

Shapes: T tokens, d model dim, H / KvH heads, D head dim, f FFN dim, V vocab.
"""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, float64

from minillm.kernels.cuda_linear import check_power_of_two, lane_sum
from minillm.kernels.cuda_quant import KERNEL_FORMATS, ROW_DOT


@cuda.jit(device=True, inline=True)
def stage_normed_row(x, t, norm_w, eps, staged, partial, tid, n_threads):
    """staged[0, :] = x[t] / rms(x[t]) * norm_w, computed by all n_threads of the block."""
    dim = x.shape[1]
    cuda.syncthreads()  # the previous token's staged row is no longer read
    sum_sq = float32(0.0)
    for i in range(tid, dim, n_threads):
        v = x[t, i]
        staged[0, i] = v
        sum_sq += v * v
    partial[tid] = sum_sq
    cuda.syncthreads()
    half = n_threads // 2
    while half > 0:
        if tid < half:
            partial[tid] += partial[tid + half]
        cuda.syncthreads()
        half //= 2
    inv_rms = float32(1.0) / math.sqrt(partial[0] / float32(dim) + eps)
    cuda.syncthreads()  # everyone has read partial[0]
    for i in range(tid, dim, n_threads):
        staged[0, i] = staged[0, i] * inv_rms * norm_w[i]
    cuda.syncthreads()


def _check(formats: tuple[str, ...], lanes: int, rows_per_block: int) -> None:
    for fmt in formats:
        if fmt not in KERNEL_FORMATS:
            raise ValueError(f"no fused kernel for format {fmt!r}; have {sorted(KERNEL_FORMATS)}")
    check_power_of_two("lanes", lanes)
    check_power_of_two("lanes * rows_per_block", lanes * rows_per_block)


@functools.cache
def make_qkv(fq: str, fk: str, fv: str, lanes: int, rows_per_block: int, dim: int):  # noqa: ANN201
    """out (T, Nq + Nk + Nv) = norm(x) @ [Wq; Wk; Wv].T (+ biases), one grid over all rows.

    x (T, d) with d == dim; launch (row groups, tokens) blocks of (lanes, rows_per_block).
    """
    _check((fq, fk, fv), lanes, rows_per_block)
    dot_q, dot_k, dot_v = ROW_DOT[fq], ROW_DOT[fk], ROW_DOT[fv]
    n_threads = lanes * rows_per_block

    def qkv(x, norm_w, eps, wq, wk, wv, bq, bk, bv, use_bias, out):
        lane, slot = cuda.threadIdx.x, cuda.threadIdx.y
        tid = slot * lanes + lane
        staged = cuda.shared.array((1, dim), float32)
        partial_n = cuda.shared.array(n_threads, float32)
        partial = cuda.shared.array((rows_per_block, lanes), float32)
        n_q, n_k = wq.shape[0], wk.shape[0]
        n_rows = out.shape[1]
        for t in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):
            stage_normed_row(x, t, norm_w, eps, staged, partial_n, tid, n_threads)
            for first in range(
                cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block
            ):
                row = first + slot
                acc = float32(0.0)
                if row < n_q:
                    acc = dot_q(wq, row, lane, lanes, staged, 0)
                elif row < n_q + n_k:
                    acc = dot_k(wk, row - n_q, lane, lanes, staged, 0)
                elif row < n_rows:
                    acc = dot_v(wv, row - n_q - n_k, lane, lanes, staged, 0)
                total = lane_sum(acc, partial, slot, lane, lanes)
                if lane == 0 and row < n_rows:
                    if use_bias:
                        if row < n_q:
                            total += bq[row]
                        elif row < n_q + n_k:
                            total += bk[row - n_q]
                        else:
                            total += bv[row - n_q - n_k]
                    out[t, row] = total

    return cuda.jit(qkv)


@functools.cache
def make_glu(fg: str, fu: str, lanes: int, rows_per_block: int, dim: int):  # noqa: ANN201
    """out (T, f) = silu(norm(x) @ Wg.T) * (norm(x) @ Wu.T): a row slot computes row r of both
    weights, so gate and up never leave registers. x (T, d) with d == dim."""
    _check((fg, fu), lanes, rows_per_block)
    dot_g, dot_u = ROW_DOT[fg], ROW_DOT[fu]
    n_threads = lanes * rows_per_block

    def glu(x, norm_w, eps, wg, wu, out):
        lane, slot = cuda.threadIdx.x, cuda.threadIdx.y
        tid = slot * lanes + lane
        staged = cuda.shared.array((1, dim), float32)
        partial_n = cuda.shared.array(n_threads, float32)
        partial = cuda.shared.array((rows_per_block, lanes), float32)
        n_rows = out.shape[1]
        for t in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):
            stage_normed_row(x, t, norm_w, eps, staged, partial_n, tid, n_threads)
            for first in range(
                cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block
            ):
                row = first + slot
                acc_g = float32(0.0)
                acc_u = float32(0.0)
                if row < n_rows:
                    acc_g = dot_g(wg, row, lane, lanes, staged, 0)
                    acc_u = dot_u(wu, row, lane, lanes, staged, 0)
                gate = lane_sum(acc_g, partial, slot, lane, lanes)
                up = lane_sum(acc_u, partial, slot, lane, lanes)
                if lane == 0 and row < n_rows:
                    out[t, row] = gate / (float32(1.0) + math.exp(-gate)) * up

    return cuda.jit(glu)


@functools.cache
def make_norm_matvec(fmt: str, lanes: int, rows_per_block: int, dim: int):  # noqa: ANN201
    """out (S, V) = norm(x[rows]) @ W.T: the final norm and lm_head, on the sampled rows only."""
    _check((fmt,), lanes, rows_per_block)
    row_dot = ROW_DOT[fmt]
    n_threads = lanes * rows_per_block

    def norm_matvec(x, rows, norm_w, eps, w, out):
        lane, slot = cuda.threadIdx.x, cuda.threadIdx.y
        tid = slot * lanes + lane
        staged = cuda.shared.array((1, dim), float32)
        partial_n = cuda.shared.array(n_threads, float32)
        partial = cuda.shared.array((rows_per_block, lanes), float32)
        n_rows = out.shape[1]
        for s in range(cuda.blockIdx.y, rows.shape[0], cuda.gridDim.y):
            stage_normed_row(x, rows[s], norm_w, eps, staged, partial_n, tid, n_threads)
            for first in range(
                cuda.blockIdx.x * rows_per_block, n_rows, cuda.gridDim.x * rows_per_block
            ):
                row = first + slot
                acc = float32(0.0)
                if row < n_rows:
                    acc = row_dot(w, row, lane, lanes, staged, 0)
                total = lane_sum(acc, partial, slot, lane, lanes)
                if lane == 0 and row < n_rows:
                    out[s, row] = total

    return cuda.jit(norm_matvec)


@functools.cache
def make_rope_table():  # noqa: ANN201 - a numba.cuda kernel
    """cos, sin (T, D/2) of position[t] * inv_freq[j], once per step for every layer.

    The angle is formed in float64, as the model's host code does, then rounded to float32:
    at position 8000 an fp32 angle would already be off by ~5e-4 rad. This is the one kernel
    that computes in float64 (T * D/2 values a step, not per layer)."""

    def rope_table(positions, inv_freq, cos, sin):
        n_tok, half = cos.shape
        for i in range(cuda.grid(1), n_tok * half, cuda.gridsize(1)):
            angle = float64(positions[i // half]) * inv_freq[i % half]
            cos[i // half, i % half] = float32(math.cos(angle))
            sin[i // half, i % half] = float32(math.sin(angle))

    return cuda.jit(rope_table)


@functools.cache
def make_rope_store():  # noqa: ANN201 - a numba.cuda kernel
    """q (T, H, D) = rope(q part of qkv); k = rope(k part) and v go to their cache slots.

    qkv (T, H*D + 2*KvH*D) as ``qkv`` wrote it; caches (NB, BS, KvH, D); slots (T,), negative
    for padding. One thread per pair (j, j + D/2) of one head: a q head, a k head (rotated, then
    stored) or a v head (copied)."""

    def rope_store(qkv, cos, sin, slots, k_cache, v_cache, q):
        n_tok, n_head, dim = q.shape
        n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
        half = dim // 2
        heads = n_head + 2 * n_kv
        for i in range(cuda.grid(1), n_tok * heads * half, cuda.gridsize(1)):
            t = i // (heads * half)
            head = (i // half) % heads
            j = i % half
            col = head * dim + j  # q heads, then k heads, then v heads, D columns each
            a = qkv[t, col]
            b = qkv[t, col + half]
            if head < n_head + n_kv:  # rotate the pair
                c = cos[t, j]
                s = sin[t, j]
                a, b = a * c - b * s, b * c + a * s
            if head < n_head:
                q[t, head, j] = a
                q[t, head, j + half] = b
                continue
            slot = slots[t]
            if slot < 0:
                continue
            blk = slot // block_size
            off = slot % block_size
            if head < n_head + n_kv:
                k_cache[blk, off, head - n_head, j] = a
                k_cache[blk, off, head - n_head, j + half] = b
            else:
                v_cache[blk, off, head - n_head - n_kv, j] = a
                v_cache[blk, off, head - n_head - n_kv, j + half] = b

    return cuda.jit(rope_store)
