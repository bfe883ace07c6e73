"""Numba matmul kernels that read quantized weights directly: y (T, N) = x (T, K) @ W.T.

Decode is memory-bound: every weight byte is read once per step, and a 4-bit weight costs an
eighth of the bytes of a float32 one. So the weights stay packed (see ``cpu_packing``) and are
decoded in registers, never written back to memory as fp32 matrices.

Two loops, chosen by T, share the packed layout:

- T == 1 (single-stream decode): one pass over each weight row. Per 32-weight block the codes
  are unpacked and multiplied by x with 32 float32 lanes that stay in SIMD registers across
  blocks; the block scale multiplies in place, the block offset is folded in via sum(x_block).
- T > 1 (prefill, batched decode): a tile of ``_ROWS`` weight rows is decoded to float32 once
  (a few KB, L1/L2-resident) and multiplied with all T rows of x, two tokens at a time, so each
  weight byte is read from memory once per step whatever T is.

Rows are split across Numba threads with ``prange``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import FASTMATH, as_float, lanes32, lanes_sum, widen

_ROWS = 4  # weight rows decoded together in the T > 1 path (4 x 2 accumulators in registers)
_GROUPS_PER_CHUNK = 8  # a thread's unit of work (32 rows): small enough to balance, big
# enough that its scratch allocation is paid rarely


# ----------------------------------------------------------------------------- row decoders
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q4_row(codes, scale, offset, offset_mult, n, dst):  # noqa: ANN001, ANN202
    """Weight row n of a q4 matrix -> dst (K,) float32."""
    for b in range(scale.shape[1]):
        d = as_float(scale[n, b])
        o = offset_mult * as_float(offset[n, b])
        for j in range(16):
            q = codes[n, b * 16 + j]
            dst[b * 32 + j] = d * np.float32(q & 15) + o
            dst[b * 32 + 16 + j] = d * np.float32(q >> 4) + o


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q8_row(codes, scale, block, n, dst):  # noqa: ANN001, ANN202
    for b in range(scale.shape[1]):
        d = as_float(scale[n, b])
        for j in range(block):
            dst[b * block + j] = d * np.float32(codes[n, b * block + j])


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _float_row(codes, is_bf16, n, dst):  # noqa: ANN001, ANN202
    for i in range(codes.shape[1]):
        dst[i] = widen(codes[n, i], is_bf16)


# ----------------------------------------------------------------------------- T > 1 tile
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _tile_times_x(x, w, n0, nr, out):  # noqa: ANN001, ANN202
    """out[:, n0:n0+nr] = x (T, K) @ w[:nr].T, w (_ROWS, K) float32; 2 tokens x 4 rows a step."""
    t_rows, k = x.shape
    t = 0
    while t + 1 < t_rows:
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
        for i in range(k):
            x0, x1 = x[t, i], x[t + 1, i]
            w0, w1, w2, w3 = w[0, i], w[1, i], w[2, i], w[3, i]
            a0 += x0 * w0
            a1 += x0 * w1
            a2 += x0 * w2
            a3 += x0 * w3
            b0 += x1 * w0
            b1 += x1 * w1
            b2 += x1 * w2
            b3 += x1 * w3
        _store4(out, t, n0, nr, a0, a1, a2, a3)
        _store4(out, t + 1, n0, nr, b0, b1, b2, b3)
        t += 2
    if t < t_rows:  # odd T: the last token alone
        a0 = a1 = a2 = a3 = np.float32(0)
        for i in range(k):
            x0 = x[t, i]
            a0 += x0 * w[0, i]
            a1 += x0 * w[1, i]
            a2 += x0 * w[2, i]
            a3 += x0 * w[3, i]
        _store4(out, t, n0, nr, a0, a1, a2, a3)


@njit(inline="always", cache=True)
def _store4(out, t, n0, nr, a0, a1, a2, a3):  # noqa: ANN001, ANN202
    out[t, n0] = a0
    if nr > 1:
        out[t, n0 + 1] = a1
    if nr > 2:
        out[t, n0 + 2] = a2
    if nr > 3:
        out[t, n0 + 3] = a3


# ----------------------------------------------------------------------------- T == 1
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q4_matvec(x, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """x (K,) float32; codes (N, K/2) uint8; scale/offset (N, K/32); out (N,) float32."""
    k = x.shape[0]
    n_rows, nb = scale.shape
    # The high nibble is read as (byte & 0xF0) = 16 q, so its x is divided by 16 once here
    # (exact, a power of two) instead of shifting every byte: no shift in the inner loop.
    xs = np.empty(k, np.float32)
    x_sum = np.empty(nb, np.float32)  # offset_mult * sum of x over each block
    for b in range(nb):
        s = np.float32(0)
        for j in range(16):
            xs[b * 32 + j] = x[b * 32 + j]
            xs[b * 32 + 16 + j] = x[b * 32 + 16 + j] * np.float32(1 / 16)
            s += x[b * 32 + j] + x[b * 32 + 16 + j]
        x_sum[b] = offset_mult * s
    for n in prange(n_rows):
        acc = lanes32()
        off = np.float32(0)
        for b in range(nb):
            d = as_float(scale[n, b])
            for j in range(16):
                q = np.int32(codes[n, b * 16 + j])
                acc[j] += d * (xs[b * 32 + j] * np.float32(q & 0x0F))
                acc[16 + j] += d * (xs[b * 32 + 16 + j] * np.float32(q & 0xF0))
            off += as_float(offset[n, b]) * x_sum[b]
        out[n] = lanes_sum(acc) + off


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_matvec(x, codes, scale, out):  # noqa: ANN001, ANN201
    """x (K,); codes (N, K) int8; scale (N, K/32) (Q8_0); out (N,)."""
    n_rows, nb = scale.shape
    for n in prange(n_rows):
        acc = lanes32()
        for b in range(nb):
            d = as_float(scale[n, b])
            for j in range(32):
                acc[j] += d * (x[b * 32 + j] * np.float32(codes[n, b * 32 + j]))
        out[n] = lanes_sum(acc)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_16_matvec(x, codes, scale, out):  # noqa: ANN001, ANN201
    """As q8_matvec with one scale per 16 weights (Q6_K): scale (N, K/16)."""
    n_rows, nb = scale.shape
    for n in prange(n_rows):
        acc = lanes32()
        for c in range(nb // 2):
            d_lo, d_hi = as_float(scale[n, 2 * c]), as_float(scale[n, 2 * c + 1])
            for j in range(16):
                acc[j] += d_lo * (x[c * 32 + j] * np.float32(codes[n, c * 32 + j]))
                acc[16 + j] += d_hi * (x[c * 32 + 16 + j] * np.float32(codes[n, c * 32 + 16 + j]))
        out[n] = lanes_sum(acc)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def float_matvec(x, codes, is_bf16, out):  # noqa: ANN001, ANN201
    """x (K,); codes (N, K) float32, or uint16 fp16/bf16 bits; out (N,)."""
    for n in prange(codes.shape[0]):
        acc = np.float32(0)
        for i in range(x.shape[0]):
            acc += x[i] * widen(codes[n, i], is_bf16)
        out[n] = acc


# ----------------------------------------------------------------------------- T > 1
@njit(inline="always", cache=True)
def _row_groups(n_rows):  # noqa: ANN001, ANN202
    """(groups of _ROWS rows, chunks of _GROUPS_PER_CHUNK groups handed to the threads)."""
    groups = (n_rows + _ROWS - 1) // _ROWS
    return groups, (groups + _GROUPS_PER_CHUNK - 1) // _GROUPS_PER_CHUNK


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q4_matmul(x, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K/2) uint8; scale/offset (N, K/32); out (T, N)."""
    n_rows, k = codes.shape[0], x.shape[1]
    groups, chunks = _row_groups(n_rows)
    for c in prange(chunks):
        w = np.empty((_ROWS, k), np.float32)  # this chunk's decoded rows, reused per group
        for g in range(c * _GROUPS_PER_CHUNK, min(groups, (c + 1) * _GROUPS_PER_CHUNK)):
            n0 = g * _ROWS
            nr = min(_ROWS, n_rows - n0)
            for r in range(nr):
                _q4_row(codes, scale, offset, offset_mult, n0 + r, w[r])
            _tile_times_x(x, w, n0, nr, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_matmul(x, codes, scale, block, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K) int8; scale (N, K/block); out (T, N)."""
    n_rows, k = codes.shape[0], x.shape[1]
    groups, chunks = _row_groups(n_rows)
    for c in prange(chunks):
        w = np.empty((_ROWS, k), np.float32)
        for g in range(c * _GROUPS_PER_CHUNK, min(groups, (c + 1) * _GROUPS_PER_CHUNK)):
            n0 = g * _ROWS
            nr = min(_ROWS, n_rows - n0)
            for r in range(nr):
                _q8_row(codes, scale, block, n0 + r, w[r])
            _tile_times_x(x, w, n0, nr, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def float_matmul(x, codes, is_bf16, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K) float32 or uint16 bits; out (T, N)."""
    n_rows, k = codes.shape[0], x.shape[1]
    groups, chunks = _row_groups(n_rows)
    for c in prange(chunks):
        w = np.empty((_ROWS, k), np.float32)
        for g in range(c * _GROUPS_PER_CHUNK, min(groups, (c + 1) * _GROUPS_PER_CHUNK)):
            n0 = g * _ROWS
            nr = min(_ROWS, n_rows - n0)
            for r in range(nr):
                _float_row(codes, is_bf16, n0 + r, w[r])
            _tile_times_x(x, w, n0, nr, out)


# ----------------------------------------------------------------------------- embedding
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q4_rows(ids, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """out[t] = dequantized row ids[t]: only the looked-up rows are decoded."""
    for t in prange(ids.shape[0]):
        _q4_row(codes, scale, offset, offset_mult, ids[t], out[t])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_rows(ids, codes, scale, block, out):  # noqa: ANN001, ANN201
    for t in prange(ids.shape[0]):
        _q8_row(codes, scale, block, ids[t], out[t])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def float_rows(ids, codes, is_bf16, out):  # noqa: ANN001, ANN201
    for t in prange(ids.shape[0]):
        _float_row(codes, is_bf16, ids[t], out[t])
