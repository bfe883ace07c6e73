"""Matmuls with int8 activations (W4A8, W8A8): the way llama.cpp computes on the CPU.

The float kernels (``cpu_q4``, ``cpu_linear``) decode every weight to float32 and spend one
16-lane fused multiply-add per 16 products. Once several tokens share each weight (batched
decode, prefill), that arithmetic, not memory, is the wall: 2 cores reach ~500 GFLOP/s of fp32.
llama.cpp's answer: quantize the *activations* too, to int8 in blocks of 32 with one float scale
(its Q8_0/Q8_1 blocks), and multiply bytes by bytes. One ``vpdpbusd`` (AVX-512 VNNI) does 64
byte products and adds them into 16 int32 lanes: four times the products of a float FMA.

    y_n = sum over blocks b of  d_w[n,b] d_x[b] * sum_j q_w[n,j] q_x[j]   +  m_w[n,b] * s_x[b]
                                                  '----- exact int32 -----'
where s_x[b] = d_x[b] * sum_j q_x[j] carries the weights' block offset (Q4_1, Q4_K: value =
d q + m; Q4_0: m = -8 d). The integer sums are exact; the only new error is the rounding of x to
8 bits (relative ~1/254 per value, averaging out over a dot product).

Weights keep the layout of the float kernels (``cpu_packing``): 4-bit codes in 16-row panels,
int8 codes row-major, so the two activation modes share one copy of the model. The integer
dot products are in ``cpu_vnni``; here are the quantizer and the loops around them:

- one token (decode): every weight is used once; memory-bound, as before;
- groups of 16 tokens (8 for a last odd group; batched decode, prefill): the shuffled weight
  bytes are reused for every token of the group, and a token's activations are 4-byte
  broadcasts from L1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import (
    FASTMATH,
    PREFETCH_AHEAD,
    as_float,
    lanes,
    prefetch_range,
)
from minillm.kernels.cpu_packing import PANEL
from minillm.kernels.cpu_vnni import q4_block_fma, q8_block_fma, quantize_block

QBLOCK = 32  # activations per scale, as llama.cpp's Q8_0
TOKENS = 8  # x is padded to a multiple of this many tokens for the batched kernels
WIDE = 16  # tokens per pass where 16 remain: the shuffled weights serve twice as many tokens
TOKENS_IN_L2 = 128  # tokens of int8 x (128 x 1536 bytes) that stay in L2 while every panel passes
ONE_BY_ONE_BELOW = 4  # fewer tokens: the one-token kernel per token
# tokens; below, one thread quantizes (at ~0.4 ns a value, a thread start costs more)
PARALLEL_QUANTIZE_FROM = 128


# ----------------------------------------------------------------------------- activations
@njit(inline="always", cache=True)
def _quantize_row(x, t, xq, xd, xs, sum16):  # noqa: ANN001, ANN202
    """Token t: per block of 32, d = max|x| / 127, q = round-half-even(x / d) (ggml's Q8_0
    rule, with x * (1/d) as ggml computes it); xs = d * sum(q); sum16: sums of 16 q."""
    k, nb = x.shape[1], xd.shape[1]
    x_flat, xq_flat = x.reshape(-1), xq.reshape(-1)
    xd_flat, xs_flat, sum16_flat = xd.reshape(-1), xs.reshape(-1), sum16.reshape(-1)
    for b in range(nb):
        quantize_block(x_flat, t * k + b * QBLOCK, xq_flat, t * k + b * QBLOCK, xd_flat,
                       xs_flat, t * nb + b, sum16_flat)  # fmt: skip


@njit(inline="always", cache=True)
def _quantized_buffers(x, multiple):  # noqa: ANN001, ANN202
    t_rows, k = x.shape
    padded = -(-t_rows // multiple) * multiple  # zero rows past T: harmless extra tokens
    xq = np.zeros((padded, k), np.int8)
    xd = np.zeros((padded, k // QBLOCK), np.float32)
    xs = np.zeros((padded, k // QBLOCK), np.float32)
    sum16 = np.zeros((padded, k // 16), np.int32)
    return xq, xd, xs, sum16


@njit(nogil=True, cache=True)
def _quantize_serial(x, multiple):  # noqa: ANN001, ANN202
    xq, xd, xs, sum16 = _quantized_buffers(x, multiple)
    for t in range(x.shape[0]):
        _quantize_row(x, t, xq, xd, xs, sum16)
    return xq, xd, xs, sum16


@njit(nogil=True, parallel=True, cache=True)
def _quantize_parallel(x, multiple):  # noqa: ANN001, ANN202
    xq, xd, xs, sum16 = _quantized_buffers(x, multiple)
    for t in prange(x.shape[0]):
        _quantize_row(x, t, xq, xd, xs, sum16)
    return xq, xd, xs, sum16


@njit(nogil=True, cache=True)
def quantize_activations(x, multiple=1):  # noqa: ANN001, ANN201
    """x (T, K) float32, K a multiple of 32 -> (xq int8 (T', K), xd (T', K/32) scales,
    xs (T', K/32) = xd * block sums, sum16 (T', K/16) int32 sums of 16), T' = T rounded up to
    `multiple` with zero rows."""
    x = np.ascontiguousarray(x)
    if x.shape[0] >= PARALLEL_QUANTIZE_FROM:
        return _quantize_parallel(x, multiple)
    return _quantize_serial(x, multiple)


@njit(inline="always", cache=True)
def quantize_for_matmul(x, int8_activations):  # noqa: ANN001, ANN201
    """x quantized as the matmuls below take it (padded to TOKENS rows when the group kernels
    will run), or empty arrays when int8_activations is False. Matmuls that share an input
    (q, k, v; gate, up) share one quantization (``cpu_layer``)."""
    if not int8_activations:
        return _quantized_buffers(x[:0], 1)  # nothing to quantize: no call, no copy
    return quantize_activations(x, 1 if x.shape[0] < ONE_BY_ONE_BELOW else TOKENS)


# ----------------------------------------------------------------------------- q4 panels
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q4_panel(xq, xd, xs, t0, codes, scale, offset, mult, p, out, tokens, slots):  # noqa: ANN001, ANN202, PLR0913
    """Panel p's 16 outputs for tokens t0 .. t0 + tokens - 1 (slots = 16 x tokens, a literal)."""
    nb, k = scale.shape[1], xq.shape[1]
    xq_flat, codes_flat = xq.reshape(-1), codes.reshape(-1)
    xd_flat, xs_flat = xd.reshape(-1), xs.reshape(-1)
    scale_flat, offset_flat = scale.reshape(-1), offset.reshape(-1)
    acc = lanes(slots)
    for b in range(nb):
        q4_block_fma(acc, codes_flat, (p * nb + b) * 16 * PANEL, xq_flat, t0 * k + b * QBLOCK, k,
                     scale_flat, offset_flat, (p * nb + b) * PANEL, mult, xd_flat, xs_flat,
                     t0 * nb + b, nb, tokens)  # fmt: skip
    n0 = p * PANEL
    for i in range(min(tokens, out.shape[0] - t0)):
        for r in range(min(PANEL, out.shape[1] - n0)):
            out[t0 + i, n0 + r] = acc[16 * i + r]


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q4_a8_one(xq, xd, xs, t, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """Row t of out (T, N) from row t of the quantized x: one token, every panel once."""
    mult = np.float32(offset_mult)
    n_panels = codes.shape[0]
    flat, panel_bytes = codes.reshape(-1), codes.shape[1] * 16 * PANEL
    for p in prange(n_panels):
        prefetch_range(flat, p * panel_bytes + PREFETCH_AHEAD, panel_bytes)
        _q4_panel(xq, xd, xs, t, codes, scale, offset, mult, p, out, 1, 16)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q4_a8_groups(xq, xd, xs, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """out (T, N) for x quantized with T rounded up to a multiple of TOKENS: 16 tokens a pass
    while 16 remain, then 8 (16 float accumulators: measured 1.05-1.3x faster than 8 at T=16)."""
    mult = np.float32(offset_mult)
    padded, n_panels = xq.shape[0], codes.shape[0]
    for t0 in range(0, padded, TOKENS_IN_L2):
        t1 = min(t0 + TOKENS_IN_L2, padded)
        for p in prange(n_panels):
            for t in range(t0, t1, WIDE):
                if t + WIDE <= t1:
                    _q4_panel(xq, xd, xs, t, codes, scale, offset, mult, p, out, 16, 256)
                else:
                    _q4_panel(xq, xd, xs, t, codes, scale, offset, mult, p, out, 8, 128)


@njit(inline="always", cache=True)
def q4_a8_matmul(xquant, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """out (T, N) = x (T, K) @ W.T, xquant = quantize_for_matmul(x) (q4 PackedWeight arrays)."""
    xq, xd, xs, _ = xquant
    if out.shape[0] < ONE_BY_ONE_BELOW:
        for t in range(out.shape[0]):
            q4_a8_one(xq, xd, xs, t, codes, scale, offset, offset_mult, out)
    else:
        q4_a8_groups(xq, xd, xs, codes, scale, offset, offset_mult, out)


# ----------------------------------------------------------------------------- q8 panels
@njit(inline="always", fastmath=FASTMATH, cache=True)
def _q8_panel(xq, xd, sum16, t0, codes, scale, p, out, tokens, slots):  # noqa: ANN001, ANN202, PLR0913
    """Panel p's 16 outputs for tokens t0 .. t0 + tokens - 1 (slots = 16 x tokens, a literal).
    scale (P, K/block, 16): one scale per 32 weights (Q8_0, Q5_0) or per 16 (Q6_K)."""
    nb, k = codes.shape[1], xq.shape[1]
    per_block = scale.shape[1] // nb  # 1 or 2 scales per 32 weights
    xq_flat, codes_flat = xq.reshape(-1), codes.reshape(-1)
    xd_flat, sum16_flat = xd.reshape(-1), sum16.reshape(-1)
    scale_flat, n_scales = scale.reshape(-1), scale.shape[1]
    acc = lanes(slots)
    for b in range(nb):
        lo_at = (p * n_scales + per_block * b) * PANEL  # the half-blocks' 16 scales
        hi_at = lo_at + (per_block - 1) * PANEL
        q8_block_fma(acc, codes_flat, (p * nb + b) * 32 * PANEL, xq_flat, t0 * k + b * QBLOCK, k,
                     scale_flat, lo_at, hi_at, xd_flat, t0 * 2 * nb + 2 * b, 2 * nb, sum16_flat,
                     tokens)  # fmt: skip
    n0 = p * PANEL
    for i in range(min(tokens, out.shape[0] - t0)):
        for r in range(min(PANEL, out.shape[1] - n0)):
            out[t0 + i, n0 + r] = acc[16 * i + r]


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q8_a8_one(xq, xd, sum16, t, codes, scale, out):  # noqa: ANN001, ANN201
    """Row t of out from row t of the quantized x: one token, every panel once."""
    flat, panel_bytes = codes.reshape(-1), codes.shape[1] * 32 * PANEL
    for p in prange(codes.shape[0]):
        prefetch_range(flat, p * panel_bytes + PREFETCH_AHEAD, panel_bytes)
        _q8_panel(xq, xd, sum16, t, codes, scale, p, out, 1, 16)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q8_a8_groups(xq, xd, sum16, codes, scale, out):  # noqa: ANN001, ANN201
    """out (T, N) for x quantized with T rounded up to a multiple of TOKENS, as q4_a8_groups."""
    padded, n_panels = xq.shape[0], codes.shape[0]
    for t0 in range(0, padded, TOKENS_IN_L2):
        t1 = min(t0 + TOKENS_IN_L2, padded)
        for p in prange(n_panels):
            for t in range(t0, t1, WIDE):
                if t + WIDE <= t1:
                    _q8_panel(xq, xd, sum16, t, codes, scale, p, out, 16, 256)
                else:
                    _q8_panel(xq, xd, sum16, t, codes, scale, p, out, 8, 128)


@njit(inline="always", cache=True)
def q8_a8_matmul(xquant, codes, scale, out):  # noqa: ANN001, ANN201
    """out (T, N) = x (T, K) @ W.T for a q8 panel PackedWeight's arrays, as q4_a8_matmul."""
    xq, xd, _, sum16 = xquant
    if out.shape[0] < ONE_BY_ONE_BELOW:
        for t in range(out.shape[0]):
            q8_a8_one(xq, xd, sum16, t, codes, scale, out)
    else:
        q8_a8_groups(xq, xd, sum16, codes, scale, out)


# No fastmath here: d * q rounds once, exactly as the reference dequantizer does.
@njit(nogil=True, parallel=True, cache=True)
def q8_panel_rows(ids, codes, scale, out):  # noqa: ANN001, ANN201
    """out[t] = dequantized row ids[t] of a q8 panel weight (embedding lookup)."""
    per_block = scale.shape[1] // codes.shape[1]
    for t in prange(ids.shape[0]):
        p, r = ids[t] // PANEL, ids[t] % PANEL
        for b in range(codes.shape[1]):
            for j in range(QBLOCK):
                d = as_float(scale[p, per_block * b + (j // 16) * (per_block - 1), r])
                out[t, b * QBLOCK + j] = d * np.float32(codes[p, b, j // 4, 4 * r + j % 4])
