"""Device functions that read GGUF block formats inside numba.cuda kernels.

The GPU keeps a quantized weight as the very bytes of the GGUF file (uint8, one row of blocks
per output row), because decode is memory-bound: a Q4_1 weight costs 5 bits per value to read
instead of 32. The kernels turn the bytes into numbers in registers, as llama.cpp's CUDA
backend does.

Two kinds of helpers per format, each with the layout spelled out next to it:

- ``dot_<fmt>(w, row, blk, x, t)``: one block of row ``row`` dotted with token ``t`` of
  ``x (T, K)``. The matvec kernel calls it for the blocks its lane owns.
- ``value_<fmt>(w, row, col)``: one weight, for the embedding lookup.

Everything stays float32: a stray Python float in a kernel makes numba compute in float64,
which is 32-64x slower on consumer GPUs.

These functions read the module-global ``cuda`` only through ``cuda.jit``; kernels that call
them work in the simulator and on a GPU alike.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

# format -> (weights per block, bytes per block): the layouts this file can read
KERNEL_FORMATS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),  # stored as a float32 (rows, cols) array, not as bytes
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
}


# 2^(e - 25) for each 5-bit fp16 exponent e; numba freezes a global array into the kernel as a
# constant, so the table costs no argument and no load from global memory.
_EXP2 = np.array([2.0 ** (e - 25) for e in range(32)], dtype=np.float32)


@cuda.jit(device=True, inline=True)
def half_to_float(lo, hi):
    """Two little-endian bytes of an IEEE fp16 -> float32 (GGUF stores block scales so).

    fp16 = sign | 5-bit exponent e (bias 15) | 10-bit mantissa m; its value is
    (1024 + m) * 2^(e - 25), or m * 2^-24 when e = 0 (zero and subnormals). Integer ops and a
    table only, so the same code runs on every GPU and in the simulator. Infinities and NaNs
    (e = 31) are not decoded: a GGUF block scale is always finite.
    """
    bits = int32(lo) | (int32(hi) << 8)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        magnitude = float32(mantissa) * _EXP2[1]
    else:
        magnitude = float32(mantissa | 0x400) * _EXP2[exponent]
    if bits & 0x8000:
        return -magnitude
    return magnitude


@cuda.jit(device=True, inline=True)
def signed_byte(b):
    """A uint8 holding an int8 (two's complement) -> int32."""
    q = int32(b)
    return q - ((q >> 7) << 8)


# ------------------------------------------------------------------------------------- dots
@cuda.jit(device=True, inline=True)
def dot_f32(w, row, blk, x, t):
    # w float32 (N, K): a "block" is one weight, so adjacent lanes read adjacent floats
    return w[row, blk] * x[t, blk]


@cuda.jit(device=True, inline=True)
def dot_q8_0(w, row, blk, x, t):
    # [0:2] d fp16 | [2:34] q int8[32];  w = d * q
    base = blk * 34
    col = blk * 32
    acc = float32(0.0)
    for j in range(32):
        acc += float32(signed_byte(w[row, base + 2 + j])) * x[t, col + j]
    return half_to_float(w[row, base], w[row, base + 1]) * acc


@cuda.jit(device=True, inline=True)
def dot_q4_0(w, row, blk, x, t):
    # [0:2] d fp16 | [2:18] 16 bytes: weight j in the low nibble of byte j, weight j+16 in the
    # high nibble;  w = d * (q - 8)
    base = blk * 18
    col = blk * 32
    acc = float32(0.0)
    for j in range(16):
        byte = int32(w[row, base + 2 + j])
        acc += float32((byte & 0xF) - 8) * x[t, col + j]
        acc += float32((byte >> 4) - 8) * x[t, col + j + 16]
    return half_to_float(w[row, base], w[row, base + 1]) * acc


@cuda.jit(device=True, inline=True)
def dot_q4_1(w, row, blk, x, t):
    # [0:2] d fp16 | [2:4] m fp16 | [4:20] nibbles as in Q4_0;  w = d * q + m, so
    # sum(w * x) = d * sum(q * x) + m * sum(x): the offset costs one extra sum, not a multiply
    base = blk * 20
    col = blk * 32
    acc_qx = float32(0.0)
    acc_x = float32(0.0)
    for j in range(16):
        byte = int32(w[row, base + 4 + j])
        x_lo = x[t, col + j]
        x_hi = x[t, col + j + 16]
        acc_qx += float32(byte & 0xF) * x_lo + float32(byte >> 4) * x_hi
        acc_x += x_lo + x_hi
    d = half_to_float(w[row, base], w[row, base + 1])
    m = half_to_float(w[row, base + 2], w[row, base + 3])
    return d * acc_qx + m * acc_x


# ----------------------------------------------------------------------------------- values
@cuda.jit(device=True, inline=True)
def value_f32(w, row, col):
    return w[row, col]


@cuda.jit(device=True, inline=True)
def value_q8_0(w, row, col):
    base = (col // 32) * 34
    q = signed_byte(w[row, base + 2 + col % 32])
    return half_to_float(w[row, base], w[row, base + 1]) * float32(q)


@cuda.jit(device=True, inline=True)
def _nibble(byte, j):
    """Weight j (0..31) of a Q4 block sits in byte j % 16: low nibble for j < 16, else high."""
    if j < 16:
        return byte & 0xF
    return byte >> 4


@cuda.jit(device=True, inline=True)
def value_q4_0(w, row, col):
    base = (col // 32) * 18
    j = col % 32
    q = _nibble(int32(w[row, base + 2 + j % 16]), j)
    return half_to_float(w[row, base], w[row, base + 1]) * float32(q - 8)


@cuda.jit(device=True, inline=True)
def value_q4_1(w, row, col):
    base = (col // 32) * 20
    j = col % 32
    q = _nibble(int32(w[row, base + 4 + j % 16]), j)
    d = half_to_float(w[row, base], w[row, base + 1])
    m = half_to_float(w[row, base + 2], w[row, base + 3])
    return d * float32(q) + m


BLOCK_DOT = {"F32": dot_f32, "Q8_0": dot_q8_0, "Q4_0": dot_q4_0, "Q4_1": dot_q4_1}


# ------------------------------------------------------------------------------ row dots
# A lane's share of one row: blocks lane, lane + lanes, ... of row `row`, dotted with token t.
# On a GPU this is exactly the loop a kernel would write around the block dot; in the
# simulator, where each device-function call costs ~10 us of Python, F32 (a "block" is one
# weight) loops inline instead of calling once per weight, which makes it ~5x faster there.
@cuda.jit(device=True, inline=True)
def row_dot_f32(w, row, lane, lanes, x, t):
    acc = float32(0.0)
    for k in range(lane, x.shape[1], lanes):
        acc += w[row, k] * x[t, k]
    return acc


def _row_dot(block_dot, per_block: int):  # noqa: ANN001, ANN202 - a device function
    @cuda.jit(device=True, inline=True)
    def row_dot(w, row, lane, lanes, x, t):
        acc = float32(0.0)
        for blk in range(lane, x.shape[1] // per_block, lanes):
            acc += block_dot(w, row, blk, x, t)
        return acc

    return row_dot


ROW_DOT = {"F32": row_dot_f32} | {
    fmt: _row_dot(BLOCK_DOT[fmt], KERNEL_FORMATS[fmt][0]) for fmt in ("Q8_0", "Q4_0", "Q4_1")
}
VALUE = {"F32": value_f32, "Q8_0": value_q8_0, "Q4_0": value_q4_0, "Q4_1": value_q4_1}
