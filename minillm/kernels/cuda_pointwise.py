"""numba.cuda kernels for the small ops: embedding, RMSNorm, RoPE, SiLU-mul, store_kv.

All but RMSNorm are *elementwise*: one thread per output element, no cooperation, so the only
things that matter are coalescing (thread i touches element i, so a warp reads one contiguous
stretch) and enough threads in flight. They use a grid-stride loop
(``for i in range(cuda.grid(1), total, cuda.gridsize(1))``), which is correct for any grid.

RMSNorm needs a *reduction* (the sum of squares of a row), so one block owns a row: its threads
stride over the row, park partial sums in shared memory and fold them in a tree of log2(threads)
barrier steps. Then every thread scales its own elements.

The kernel bodies read the module-global ``cuda`` (see cuda_linear.py for why).
"""

from __future__ import annotations

import functools
import math

from numba import cuda, float32

from minillm.kernels.cuda_linear import check_power_of_two
from minillm.kernels.cuda_quant import KERNEL_FORMATS, VALUE


@functools.cache
def make_embedding(fmt: str):  # noqa: ANN201 - a numba.cuda kernel
    """out (T, d) = rows ids (T,) of table (V, d), dequantized on the fly from format `fmt`."""
    if fmt not in KERNEL_FORMATS:
        raise ValueError(f"no embedding kernel for format {fmt!r}; have {sorted(KERNEL_FORMATS)}")
    value = VALUE[fmt]

    def embedding(ids, table, out):
        n_tok, dim = out.shape
        for i in range(cuda.grid(1), n_tok * dim, cuda.gridsize(1)):
            t = i // dim
            out[t, i % dim] = value(table, ids[t], i % dim)

    return cuda.jit(embedding)


@functools.cache
def make_rms_norm(threads: int):  # noqa: ANN201 - a numba.cuda kernel
    """out (T, d) = x / sqrt(mean(x^2) + eps) * weight; one block of `threads` per row."""
    check_power_of_two("threads", threads)

    def rms_norm(x, weight, eps, out):
        tid = cuda.threadIdx.x
        partial = cuda.shared.array(threads, float32)
        n_tok, dim = x.shape
        for t in range(cuda.blockIdx.x, n_tok, cuda.gridDim.x):
            sum_sq = float32(0.0)
            for i in range(tid, dim, threads):  # strided: neighbouring threads, neighbouring x
                sum_sq += x[t, i] * x[t, i]
            partial[tid] = sum_sq
            cuda.syncthreads()
            half = threads // 2
            while half > 0:
                if tid < half:
                    partial[tid] += partial[tid + half]
                cuda.syncthreads()
                half //= 2
            inv_rms = float32(1.0) / math.sqrt(partial[0] / float32(dim) + eps)
            for i in range(tid, dim, threads):
                out[t, i] = x[t, i] * inv_rms * weight[i]
            cuda.syncthreads()  # partial[0] is read by all before the next row overwrites it

    return cuda.jit(rms_norm)


@functools.cache
def make_rope():  # noqa: ANN201 - a numba.cuda kernel
    """out (T, H, D): rotate pairs (j, j + D/2) of each head by angle (t, j); cos/sin (T, D/2).

    One thread per pair: it reads x[j] and x[j + D/2] and writes both rotated values.
    """

    def rope(x, cos, sin, out):
        n_tok, n_head, dim = x.shape
        half = dim // 2
        for i in range(cuda.grid(1), n_tok * n_head * half, cuda.gridsize(1)):
            t = i // (n_head * half)
            h = (i // half) % n_head
            j = i % half
            x1 = x[t, h, j]
            x2 = x[t, h, j + half]
            c = cos[t, j]
            s = sin[t, j]
            out[t, h, j] = x1 * c - x2 * s
            out[t, h, j + half] = x2 * c + x1 * s

    return cuda.jit(rope)


@functools.cache
def make_silu_mul():  # noqa: ANN201 - a numba.cuda kernel
    """out (n,) = silu(gate) * up = gate / (1 + exp(-gate)) * up, on flattened arrays."""

    def silu_mul(gate, up, out):
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            g = gate[i]
            out[i] = g / (float32(1.0) + math.exp(-g)) * up[i]

    return cuda.jit(silu_mul)


@functools.cache
def make_store_kv():  # noqa: ANN201 - a numba.cuda kernel
    """Scatter k/v (T, KvH, D) into caches (NB, BS, KvH, D) at slots (T,): slot = block*BS + off.

    A thread per element; the D elements of one (token, head) are contiguous in both the input
    and the cache slot, so a warp writes whole cache lines.
    """

    def store_kv(k, v, k_cache, v_cache, slot_mapping):
        n_tok, n_kv, dim = k.shape
        block_size = k_cache.shape[1]
        for i in range(cuda.grid(1), n_tok * n_kv * dim, cuda.gridsize(1)):
            t = i // (n_kv * dim)
            h = (i // dim) % n_kv
            d = i % dim
            slot = slot_mapping[t]
            if slot >= 0:  # a negative slot marks a padding token: nothing to store
                blk = slot // block_size
                off = slot % block_size
                k_cache[blk, off, h, d] = k[t, h, d]
                v_cache[blk, off, h, d] = v[t, h, d]

    return cuda.jit(store_kv)
