"""Numba kernels for 4-bit weights in 16-row panels: y (T, N) = x (T, K) @ W.T.

The weights keep their GGUF bytes (see ``cpu_packing``), but 16 rows are interleaved: one
16-byte load holds code j of a block for all 16 rows of a panel. So the kernels work as an
*outer product*: decode a column of 16 weights into the 16 lanes of one SIMD register, multiply
it by one token's x[k] (broadcast), and add it to that token's 16 outputs. Each row's result
builds up in its own lane; no horizontal sums are needed at the end, and the outputs are stored
16 at a time. Formats: Q4_0, Q4_1, Q4_K (two 4-bit codes per byte).

- ``q4_matvec`` (one token: decode). Every weight is used once, so the kernel mostly streams
  the weight bytes: the block scale is taken out of the sum (d * sum(q x) + m * sum(x)), and
  several partial sums per panel hide the ~4-cycle latency of each fused multiply-add.
- ``q4_panels`` (several tokens: batched decode, prefill). A decoded weight column is reused
  for 8 tokens: 8 FMAs per column for a few decoding instructions, two panels at a time; the
  8 x 32 accumulators live in 16 SIMD registers. x is regrouped once, 8 tokens side by side
  per feature, and taken 64 tokens at a time so that they stay in L2 while every panel passes.

Accumulators are fixed-size stack arrays indexed by constants (``lanes``): LLVM keeps them in
registers. A heap array (np.zeros) would stay in memory, because LLVM cannot prove it does not
overlap the weights.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import (
    FASTMATH,
    PREFETCH_AHEAD,
    as_float,
    lanes,
    nibble_hi,
    nibble_lo,
    prefetch_range,
)
from minillm.kernels.cpu_packing import PANEL  # rows per panel, as the packing lays them out

TOKENS = 8  # tokens per pass of q4_panels: 8 x 2 panels of accumulators = 16 AVX-512 registers
GROUPS_IN_L2 = 8  # 64 tokens of x (64 x 1536 x 4 bytes = 393 KB at most) are reused from L2


@njit(inline="always", cache=True)
def _store_panel(acc, out, t, p):  # noqa: ANN001, ANN202
    """out[t, 16p : 16p + 16] = acc[:16], minus the padding rows of the last panel."""
    n0 = p * PANEL
    for r in range(min(PANEL, out.shape[1] - n0)):
        out[t, n0 + r] = acc[r]


@njit(inline="always", cache=True)
def _group_tokens(x):  # noqa: ANN001, ANN202
    """x (T, K) -> xg (ceil(T / 8), K, 8), xg[g, k, i] = x[8g + i, k], zeros past T."""
    t_rows, k = x.shape
    xg = np.zeros((-(-t_rows // TOKENS), k, TOKENS), np.float32)
    for t in range(t_rows):
        for i in range(k):
            xg[t // TOKENS, i, t % TOKENS] = x[t, i]
    return xg


# q4_panels would compute 8 tokens and throw the rest away: fewer go one by one
ONE_BY_ONE_BELOW = TOKENS // 2


# ----------------------------------------------------------------------------- q4
@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q4_matvec(x, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """x (1, K) float32; codes (P, K/32, 16, 16) uint8; scale/offset (P, K/32, 16); out (1, N).
    Eight partial sums per block (four codes x low and high nibble)."""
    n_panels, nb = codes.shape[0], codes.shape[1]
    mult = np.float32(offset_mult)
    x_sum = np.empty(nb, np.float32)  # the block offset's coefficient: mult * sum of x
    for b in range(nb):
        s = np.float32(0)
        for j in range(32):
            s += x[0, b * 32 + j]
        x_sum[b] = mult * s
    flat, panel_bytes = codes.reshape(-1), nb * 16 * PANEL
    for p in prange(n_panels):
        prefetch_range(flat, p * panel_bytes + PREFETCH_AHEAD, panel_bytes)
        acc = lanes(16)
        for b in range(nb):
            part = lanes(128)  # 8 partial sums of the block, 16 rows each
            for j in range(0, 16, 4):
                k = b * 32 + j
                for r in range(PANEL):
                    q0, q1 = codes[p, b, j, r], codes[p, b, j + 1, r]
                    q2, q3 = codes[p, b, j + 2, r], codes[p, b, j + 3, r]
                    part[r] += x[0, k] * nibble_lo(q0)
                    part[16 + r] += x[0, k + 1] * nibble_lo(q1)
                    part[32 + r] += x[0, k + 2] * nibble_lo(q2)
                    part[48 + r] += x[0, k + 3] * nibble_lo(q3)
                    part[64 + r] += x[0, k + 16] * nibble_hi(q0)
                    part[80 + r] += x[0, k + 17] * nibble_hi(q1)
                    part[96 + r] += x[0, k + 18] * nibble_hi(q2)
                    part[112 + r] += x[0, k + 19] * nibble_hi(q3)
            for r in range(PANEL):
                s = (part[r] + part[16 + r]) + (part[32 + r] + part[48 + r])
                s += (part[64 + r] + part[80 + r]) + (part[96 + r] + part[112 + r])
                acc[r] += as_float(scale[p, b, r]) * s + as_float(offset[p, b, r]) * x_sum[b]
        _store_panel(acc, out, 0, p)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def q4_panels(xg, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """xg (G, K, TOKENS): x in groups of 8 tokens, xg[g, k, i] = x[8g + i, k] (zeros past T);
    codes (P, K/32, 16, 16) uint8; scale/offset (P, K/32, 16); out (T, N), T <= 8G.

    Two panels at a time: each x value, broadcast once, multiplies both panels' columns, so
    a step is 32 multiply-adds per 16 x loads instead of 16 per 16 (1.2x faster at T = 16).
    """
    t_rows = out.shape[0]
    n_groups, n_panels, nb = xg.shape[0], codes.shape[0], codes.shape[1]
    mult = np.float32(offset_mult)
    for g0 in range(0, n_groups, GROUPS_IN_L2):  # x of these groups stays in L2 across panels
        for pair in prange((n_panels + 1) // 2):
            p, q = 2 * pair, min(2 * pair + 1, n_panels - 1)  # q = p: an odd panel count's last
            d, m = lanes(32), lanes(32)  # [r]: panel p's row r, [16 + r]: panel q's
            for g in range(g0, min(g0 + GROUPS_IN_L2, n_groups)):
                acc = lanes(256)  # [16 i + r]: token 8g + i, panel p; [128 + 16 i + r]: panel q
                for b in range(nb):
                    for r in range(PANEL):
                        d[r], m[r] = as_float(scale[p, b, r]), mult * as_float(offset[p, b, r])
                        d[16 + r] = as_float(scale[q, b, r])
                        m[16 + r] = mult * as_float(offset[q, b, r])
                    for j in range(16):
                        x_lo, x_hi = xg[g, b * 32 + j], xg[g, b * 32 + 16 + j]  # 8 tokens each
                        for r in range(PANEL):  # one SIMD register: 16 rows' weights
                            cp, cq = codes[p, b, j, r], codes[q, b, j, r]
                            p_lo, p_hi = d[r] * nibble_lo(cp) + m[r], d[r] * nibble_hi(cp) + m[r]
                            q_lo = d[16 + r] * nibble_lo(cq) + m[16 + r]
                            q_hi = d[16 + r] * nibble_hi(cq) + m[16 + r]
                            for i in range(TOKENS):  # unrolled: 16 accumulator registers
                                acc[16 * i + r] += x_lo[i] * p_lo + x_hi[i] * p_hi
                                acc[128 + 16 * i + r] += x_lo[i] * q_lo + x_hi[i] * q_hi
                for i in range(min(TOKENS, t_rows - TOKENS * g)):
                    _store_panel(acc[16 * i :], out, TOKENS * g + i, p)
                    if q != p:
                        _store_panel(acc[128 + 16 * i :], out, TOKENS * g + i, q)


# ----------------------------------------------------------------------------- dispatch
@njit(inline="always", cache=True)
def q4_matmul(x, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """out (T, N) = x (T, K) @ W.T for a q4 PackedWeight's arrays."""
    if x.shape[0] < ONE_BY_ONE_BELOW:
        for t in range(x.shape[0]):
            q4_matvec(x[t : t + 1], codes, scale, offset, offset_mult, out[t : t + 1])
    else:
        q4_panels(_group_tokens(x), codes, scale, offset, offset_mult, out)


# ----------------------------------------------------------------------------- embedding
# No fastmath here: d * q (+ m) rounds as the reference dequantizer does.
@njit(nogil=True, parallel=True, cache=True)
def q4_rows(ids, codes, scale, offset, offset_mult, out):  # noqa: ANN001, ANN201
    """out[t] = dequantized row ids[t] (embedding lookup): only those rows are decoded."""
    mult = np.float32(offset_mult)
    for t in prange(ids.shape[0]):
        p, r = ids[t] // PANEL, ids[t] % PANEL
        for b in range(codes.shape[1]):
            d, m = as_float(scale[p, b, r]), mult * as_float(offset[p, b, r])
            for j in range(16):
                q = codes[p, b, j, r]
                out[t, b * 32 + j] = d * nibble_lo(q) + m
                out[t, b * 32 + 16 + j] = d * nibble_hi(q) + m
