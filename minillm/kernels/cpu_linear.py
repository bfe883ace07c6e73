"""Numba matmul kernels that read quantized weights directly: y (T, N) = x (T, K) @ W.T.

Decode is memory-bound: every weight byte is read once per step, and a 4-bit weight costs an
eighth of the bytes of a float32 one. So the weights stay packed (see ``cpu_packing``) and are
decoded in registers; each weight row is read from memory once per call, whatever T is.

4-bit weights (Q4_0, Q4_1, Q4_K) are laid out in 16-row panels and have their own kernels in
``cpu_q4``. The int8 (Q8_0, Q5_0, Q6_K) and float kernels here read row-major weights, in two
loop shapes (``matmul`` picks the kernel family from the codes' dtype, and the loop by T):

- fused (T <= FUSED_MAX_T: decode, batched decode): rows are handed to the threads in chunks
  of ``_CHUNK`` rows; a chunk's rows stay in L1 while every pair of tokens passes over them.
  Per block the codes are converted and multiplied by x into 32 float32 lanes per token that
  live in SIMD registers across blocks; the block scale multiplies in place.
- tiled (larger T: prefill): a chunk's rows are decoded to float32 once (a few KB) and
  multiplied with all T rows of x, 4 tokens x 4 rows per step - a small register-blocked GEMM.

Why q8 is not in panels too: it was tried. For many tokens the panel kernel was faster (the
49152-row Q8_0 lm_head at T = 16: 2.9 ms instead of 4.8), but for one token it read the
matrix from memory at half the speed of the row kernel (1.5 ms instead of 0.75), and the
single-stream step is the one a chat user waits for.

Scalar arguments are cast to float32 first: a float64 anywhere in a loop makes LLVM compute in
double precision and gives up vectorizing.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from minillm.kernels.cpu_a8 import q4_a8_matmul, q8_a8_matmul, quantize_for_matmul
from minillm.kernels.cpu_numerics import (
    FASTMATH,
    PREFETCH_AHEAD,
    as_float,
    int8_to_float,
    lanes,
    lanes_sum,
    prefetch_range,
    widen,
)
from minillm.kernels.cpu_q4 import q4_matmul

FUSED_MAX_T = 8  # up to this many tokens the fused loop wins; beyond, decoding once does
_CHUNK = 16  # rows per thread work item: small enough to balance threads, big enough to reuse
_ROWS = 4  # rows decoded together in the tiled loop (4 tokens x 4 rows = 16 accumulators)


# ----------------------------------------------------------------------------- fused: q8
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q8_dot(x, codes, scale, n, t):  # noqa: ANN001, ANN202
    """Row n of a Q8_0 matrix times token t of x, alone (the unpaired leftovers)."""
    acc = lanes(32)
    for b in range(scale.shape[1]):
        d = as_float(scale[n, b])
        for j in range(32):
            acc[j] += d * (x[t, b * 32 + j] * int8_to_float(codes[n, b * 32 + j]))
    return lanes_sum(acc)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q8_fused(x, codes, scale, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K) int8; scale (N, K/32) (Q8_0); out (T, N).
    Pairs of (row, token) per pass, two independent accumulator chains: two rows for T = 1 (they
    share the x loads), two tokens otherwise (they share the decoded codes)."""
    t_rows = x.shape[0]
    n_rows, nb = scale.shape
    flat, row_bytes = codes.reshape(-1), codes.shape[1]  # for prefetching
    for c in prange((n_rows + _CHUNK - 1) // _CHUNK):
        n0, n1 = c * _CHUNK, min(n_rows, c * _CHUNK + _CHUNK)
        if t_rows == 1:
            for n in range(n0, n1 - 1, 2):
                prefetch_range(flat, n * row_bytes + PREFETCH_AHEAD, 2 * row_bytes)
                a0, a1 = lanes(32), lanes(32)
                for b in range(nb):
                    d0, d1 = as_float(scale[n, b]), as_float(scale[n + 1, b])
                    for j in range(32):
                        xj = x[0, b * 32 + j]
                        a0[j] += d0 * (xj * int8_to_float(codes[n, b * 32 + j]))
                        a1[j] += d1 * (xj * int8_to_float(codes[n + 1, b * 32 + j]))
                out[0, n] = lanes_sum(a0)
                out[0, n + 1] = lanes_sum(a1)
            if (n1 - n0) % 2:
                out[0, n1 - 1] = _q8_dot(x, codes, scale, n1 - 1, 0)
        else:
            for t in range(0, t_rows - 1, 2):
                for n in range(n0, n1):
                    a0, a1 = lanes(32), lanes(32)
                    for b in range(nb):
                        d = as_float(scale[n, b])
                        for j in range(32):
                            q = int8_to_float(codes[n, b * 32 + j])
                            a0[j] += d * (x[t, b * 32 + j] * q)
                            a1[j] += d * (x[t + 1, b * 32 + j] * q)
                    out[t, n] = lanes_sum(a0)
                    out[t + 1, n] = lanes_sum(a1)
            if t_rows % 2:
                for n in range(n0, n1):
                    out[t_rows - 1, n] = _q8_dot(x, codes, scale, n, t_rows - 1)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q8_16_matvec(x, codes, scale, out):  # noqa: ANN001, ANN201
    """One token, one scale per 16 int8 weights (Q6_K): x (K,), scale (N, K/16), out (N,)."""
    n_rows, nb = scale.shape
    for n in prange(n_rows):
        acc = lanes(32)
        for c in range(nb // 2):
            d_lo, d_hi = as_float(scale[n, 2 * c]), as_float(scale[n, 2 * c + 1])
            for j in range(16):
                acc[j] += d_lo * (x[c * 32 + j] * int8_to_float(codes[n, c * 32 + j]))
                acc[16 + j] += d_hi * (
                    x[c * 32 + 16 + j] * int8_to_float(codes[n, c * 32 + 16 + j])
                )
        out[n] = lanes_sum(acc)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def float_matvec(x, codes, is_bf16, out):  # noqa: ANN001, ANN201
    """One token: x (K,); codes (N, K) float32, or uint16 fp16/bf16 bits; out (N,)."""
    for n in prange(codes.shape[0]):
        acc = np.float32(0)
        for i in range(x.shape[0]):
            acc += x[i] * widen(codes[n, i], is_bf16)
        out[n] = acc


# ----------------------------------------------------------------------------- row decoders
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q8_row(codes, scale, block, n, dst):  # noqa: ANN001, ANN202
    for b in range(scale.shape[1]):
        d = as_float(scale[n, b])
        for j in range(block):
            dst[b * block + j] = d * int8_to_float(codes[n, b * block + j])


@njit(inline="always", fastmath=FASTMATH, cache=True)
def _float_row(codes, is_bf16, n, dst):  # noqa: ANN001, ANN202
    for i in range(codes.shape[1]):
        dst[i] = widen(codes[n, i], is_bf16)


# ----------------------------------------------------------------------------- tiled
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _tile_times_x(x, w, n0, nr, out):  # noqa: ANN001, ANN202
    """out[:, n0:n0+nr] = x (T, K) @ w[:nr].T, w (_ROWS, K) float32: 4 tokens x 4 rows a step
    (16 accumulators, 8 loads per 16 multiply-adds), the last T % 4 tokens one at a time."""
    t_rows, k = x.shape
    t = 0
    while t + 3 < t_rows:
        acc = lanes(16)  # acc[4 * token + row]
        for i in range(k):
            w0, w1, w2, w3 = w[0, i], w[1, i], w[2, i], w[3, i]
            for j in range(4):
                xj = x[t + j, i]
                acc[4 * j] += xj * w0
                acc[4 * j + 1] += xj * w1
                acc[4 * j + 2] += xj * w2
                acc[4 * j + 3] += xj * w3
        for j in range(4):
            _store4(out, t + j, n0, nr, acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3])
        t += 4
    while t < t_rows:
        a0 = a1 = a2 = a3 = np.float32(0)
        for i in range(k):
            x0 = x[t, i]
            a0 += x0 * w[0, i]
            a1 += x0 * w[1, i]
            a2 += x0 * w[2, i]
            a3 += x0 * w[3, i]
        _store4(out, t, n0, nr, a0, a1, a2, a3)
        t += 1


@njit(inline="always", cache=True)
def _store4(out, t, n0, nr, a0, a1, a2, a3):  # noqa: ANN001, ANN202
    out[t, n0] = a0
    if nr > 1:
        out[t, n0 + 1] = a1
    if nr > 2:
        out[t, n0 + 2] = a2
    if nr > 3:
        out[t, n0 + 3] = a3


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q8_tiled(x, codes, scale, block, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K) int8; scale (N, K/block); out (T, N)."""
    n_rows, k = codes.shape[0], x.shape[1]
    for c in prange((n_rows + _CHUNK - 1) // _CHUNK):
        w = np.zeros((_ROWS, k), np.float32)
        for n0 in range(c * _CHUNK, min(n_rows, c * _CHUNK + _CHUNK), _ROWS):
            nr = min(_ROWS, n_rows - n0)
            for r in range(nr):
                _q8_row(codes, scale, block, n0 + r, w[r])
            _tile_times_x(x, w, n0, nr, out)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def float_tiled(x, codes, is_bf16, out):  # noqa: ANN001, ANN201
    """x (T, K); codes (N, K) float32 or uint16 bits; out (T, N)."""
    n_rows, k = codes.shape[0], x.shape[1]
    for c in prange((n_rows + _CHUNK - 1) // _CHUNK):
        w = np.zeros((_ROWS, k), np.float32)
        for n0 in range(c * _CHUNK, min(n_rows, c * _CHUNK + _CHUNK), _ROWS):
            nr = min(_ROWS, n_rows - n0)
            for r in range(nr):
                _float_row(codes, is_bf16, n0 + r, w[r])
            _tile_times_x(x, w, n0, nr, out)


# ----------------------------------------------------------------------------- embedding
# No fastmath here: d * q rounds once, exactly as the reference dequantizer does.
@njit(nogil=True, parallel=True, cache=True)
def q8_rows(ids, codes, scale, block, out):  # noqa: ANN001, ANN201
    for t in prange(ids.shape[0]):
        _q8_row(codes, scale, block, ids[t], out[t])


@njit(nogil=True, parallel=True, cache=True)
def float_rows(ids, codes, is_bf16, out):  # noqa: ANN001, ANN201
    for t in prange(ids.shape[0]):
        _float_row(codes, is_bf16, ids[t], out[t])


# ----------------------------------------------------------------------------- dispatch
@njit(inline="always", cache=True)
def matmul(x, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out):  # noqa: ANN001, ANN201, PLR0913
    """out (T, N) = x (T, K) @ W.T, W given by a PackedWeight's arrays (its ``kernel_args``).
    With int8_activations, x is first quantized to int8 blocks (``cpu_a8``)."""
    xquant = quantize_for_matmul(x, int8_activations)
    matmul_quantized(x, xquant, codes, scale, offset, offset_mult, block, is_bf16,
                     int8_activations, out)  # fmt: skip


def matmul_quantized(
    x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out
):  # noqa: ANN001, ANN201, PLR0913
    """``matmul`` with x already quantized (xquant = ``quantize_for_matmul(x, ...)``): matmuls
    that share an input share the quantization.

    Callable from Numba code only: the overload below picks the kernel family from the codes'
    dtype and shape at compile time, and the loop shape from T at run time (few tokens: the
    fused loops; many, as in prefill: decode weight tiles once). A weight prepared for int8
    activations (its int8_activations flag) takes the integer kernels (``cpu_a8``) on xquant's
    bytes; one prepared for fp32 activations takes the float kernels on x."""
    raise NotImplementedError("only callable from Numba code")


@overload(matmul_quantized, inline="always")
def _matmul_impl(
    x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out
):  # noqa: ANN001, ANN202, PLR0913
    if codes.dtype == types.uint8:  # q4

        def q4(x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out):  # noqa: ANN001, ANN202, PLR0913
            if int8_activations:
                q4_a8_matmul(xquant, codes, scale, offset, offset_mult, out)
            else:
                q4_matmul(x, codes, scale, offset, offset_mult, out)

        return q4
    if codes.dtype == types.int8 and codes.ndim == 4:  # q8 panels: int8 activations only

        def q8_panels(
            x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out
        ):  # noqa: ANN001, ANN202, PLR0913
            q8_a8_matmul(xquant, codes, scale, out)

        return q8_panels
    if codes.dtype == types.int8:  # q8: 32 weights per scale (Q8_0, Q5_0) or 16 (Q6_K)

        def q8(x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out):  # noqa: ANN001, ANN202, PLR0913
            if block == 32 and x.shape[0] <= FUSED_MAX_T:
                q8_fused(x, codes, scale, out)
            elif x.shape[0] == 1:
                q8_16_matvec(x[0], codes, scale, out[0])
            else:
                q8_tiled(x, codes, scale, block, out)

        return q8

    def float_weights(
        x, xquant, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out
    ):  # noqa: ANN001, ANN202, PLR0913
        if x.shape[0] == 1:
            float_matvec(x[0], codes, is_bf16, out[0])
        else:
            float_tiled(x, codes, is_bf16, out)

    return float_weights


@njit(nogil=True, cache=True)
def packed_matmul(x, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out):  # noqa: ANN001, ANN201, PLR0913
    """``matmul`` for Python callers (cpu.linear)."""
    if x.shape[0]:
        matmul(x, codes, scale, offset, offset_mult, block, is_bf16, int8_activations, out)
