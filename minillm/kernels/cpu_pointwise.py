"""Numba kernels for the small per-token ops: RMSNorm, RoPE, SwiGLU's silu(gate) * up and
GeGLU's gelu(gate) * up (Gemma 3).

Each reads and writes a few KB per token, so in decode they cost less than calling them does;
they stay single-threaded except the two gates (long prefills split their rows over threads).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import FASTMATH, exp_f32


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def rms_norm_rows(x, weight, eps, out):  # noqa: ANN001, ANN202
    """out (T, d) = x / sqrt(mean(x^2) + eps) * weight, row by row."""
    t_rows, d = x.shape
    for t in range(t_rows):
        ss = np.float32(0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * inv * weight[i]


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def rope_heads(x, cos, sin, out):  # noqa: ANN001, ANN202
    """out (T, H, D): each head's pairs (i, i + D/2) rotated by its token's angles."""
    t_rows, h_count, d = x.shape
    half = d // 2
    for t in range(t_rows):
        for h in range(h_count):
            for i in range(half):
                x1, x2, c, s = x[t, h, i], x[t, h, half + i], cos[t, i], sin[t, i]
                out[t, h, i] = x1 * c - x2 * s
                out[t, h, half + i] = x2 * c + x1 * s


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def silu_mul_rows(gate, up, out):  # noqa: ANN001, ANN202
    """out (T, f) = silu(gate) * up; exp_f32, not np.exp, so that the loop vectorizes."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1) + exp_f32(-g)) * up[t, i]


_GELU_C = np.float32(0.7978845608028654)  # sqrt(2 / pi)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def gelu_tanh_mul_rows(gate, up, out):  # noqa: ANN001, ANN202
    """out (T, f) = gelu(gate) * up with GELU's tanh approximation,
    0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3); 1 + tanh(u) = 2 - 2 / (exp(2u) + 1),
    written with exp_f32 so that the loop vectorizes; |u| is clipped at 15, where tanh is 1 in
    float32, so that exp never overflows."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            u = _GELU_C * (g + np.float32(0.044715) * g * g * g)
            u = min(max(u, np.float32(-15)), np.float32(15))
            one_plus_tanh = np.float32(2) - np.float32(2) / (exp_f32(np.float32(2) * u) + 1)
            out[t, i] = np.float32(0.5) * g * one_plus_tanh * up[t, i]
