"""GGUF block formats: the bytes llama.cpp stores, and the numbers they stand for.

A weight matrix is kept as raw blocks (``QuantTensor``) so that a backend can compute on it
directly; dequantization to fp32 exists for every format and is the reference.

Every block format cuts a row into blocks of a fixed number of weights and stores each block as
a few scales plus small integers. The layouts below follow llama.cpp's ``ggml-common.h`` byte for
byte, and the quantizers of the simple formats (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0) round exactly
like llama.cpp's reference code, so our bytes equal those of ``gguf.quants.quantize``.
All multi-byte fields are little-endian, as in a GGUF file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# format -> (elements per block, bytes per block), as in llama.cpp's ggml-common.h
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}

# Blocks are (de)quantized about this many weights at a time, so that temporaries stay near the
# CPU cache (about 1 MB of float32) whatever the size of the tensor.
_CHUNK_ELEMENTS = 1 << 18


def _check_format(fmt: str) -> tuple[int, int]:
    if fmt not in BLOCK_LAYOUT:
        raise ValueError(f"unsupported tensor format {fmt!r}; known: {sorted(BLOCK_LAYOUT)}")
    return BLOCK_LAYOUT[fmt]


def bytes_per_row(fmt: str, n: int) -> int:
    """Bytes that a row of ``n`` weights takes in format ``fmt`` (n must fill whole blocks)."""
    elems, nbytes = _check_format(fmt)
    if n < 0 or n % elems:
        raise ValueError(f"{fmt}: row length {n} is not a multiple of the block size {elems}")
    return n // elems * nbytes


@dataclass(frozen=True)
class QuantTensor:
    """A tensor in a GGUF block format.

    ``data`` is uint8 of shape ``(rows, bytes_per_row)``; ``shape`` is the logical numpy
    shape, whose last dimension is the row length in elements (a multiple of the block size).
    """

    format: str
    data: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray):
            raise TypeError(f"QuantTensor data must be a numpy uint8 array, got {type(self.data)}")
        shape = tuple(self.shape)
        if not shape or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
            raise ValueError(f"QuantTensor shape must be a non-empty tuple of sizes, got {shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        row_bytes = bytes_per_row(self.format, self.shape[-1])
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        want = (rows, row_bytes)
        if self.data.dtype != np.uint8 or tuple(self.data.shape) != want:
            raise ValueError(
                f"{self.format} tensor of shape {self.shape} needs uint8 data of shape {want}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @classmethod
    def from_array(cls, values: np.ndarray, fmt: str) -> QuantTensor:
        """Quantize float values into format ``fmt`` (see :func:`quantize`)."""
        return quantize(values, fmt)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def bits_per_weight(self) -> float:
        elems, nbytes = BLOCK_LAYOUT[self.format]
        return 8.0 * nbytes / elems

    def take_rows(self, rows: np.ndarray) -> QuantTensor:
        """Select rows (a permutation or an embedding lookup) without touching the blocks."""
        data = np.ascontiguousarray(self.data[rows])
        return QuantTensor(self.format, data, (len(data), self.shape[-1]))

    def dequantize(self) -> np.ndarray:
        return dequantize(self)


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the formats
# ---------------------------------------------------------------------------------------------

QK_K = 256  # weights per "K-quant" super-block


def _f16(field: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 holding one little-endian fp16 per block -> (n, 1) float32."""
    return field.view("<f2").astype(np.float32)


def _f16_bytes(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (n, 1) -> (n, 2) uint8 fp16 (round to nearest even, like ggml's FP32_TO_FP16)."""
    h = x.astype("<f2")
    if not np.isfinite(h).all():
        raise ValueError(
            f"{fmt}: values too large to quantize: a block scale overflows fp16 (max 65504)"
        )
    return h.view(np.uint8)


def _split_nibbles(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 -> (low 4 bits, high 4 bits)."""
    return packed & np.uint8(0x0F), packed >> np.uint8(4)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (np.rint would send them to the even neighbour)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= 0.5))  # a - whole is exact in float32


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """1/d, with 0 where d == 0 (an all-zero block quantizes to zeros)."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


# ---------------------------------------------------------------------------------------------
# Dequantizers: blocks (n, bytes per block) uint8 -> (n, elements per block) float32
# ---------------------------------------------------------------------------------------------


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    # [0:4] float32
    return blocks.view("<f4").astype(np.float32)


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    # [0:2] fp16
    return _f16(blocks)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # [0:2] bfloat16 = the top 16 bits of a float32
    return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    # [0:2] d fp16 | [2:34] q int8[32];  x = d * q
    x = blocks[:, 2:].view(np.int8).astype(np.float32)
    x *= _f16(blocks[:, 0:2])
    return x


def _nibbles_as_float(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) float32: all low nibbles in order, then all high nibbles."""
    k = packed.shape[1]
    q = np.empty((len(packed), 2 * k), dtype=np.float32)
    q[:, :k], q[:, k:] = _split_nibbles(packed)
    return q


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    # [0:2] d fp16 | [2:18] 16 bytes: weight j in the low nibble of byte j, weight j+16 in the
    # high nibble;  x = d * (q - 8)
    x = _nibbles_as_float(blocks[:, 2:])
    x -= np.float32(8)
    x *= _f16(blocks[:, 0:2])
    return x


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    # [0:2] d fp16 | [2:4] m fp16 | [4:20] nibbles as in Q4_0;  x = d * q + m
    x = _nibbles_as_float(blocks[:, 4:])
    x *= _f16(blocks[:, 0:2])
    x += _f16(blocks[:, 2:4])
    return x


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    # [0:2] d fp16 | [2:6] qh: bit j of this little-endian uint32 is the 5th bit of weight j |
    # [6:22] 16 bytes of low nibbles as in Q4_0;  x = d * (q - 16)
    x = _nibbles_as_float(blocks[:, 6:])
    high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # (n, 32) of 0/1
    x += np.float32(16) * high
    x -= np.float32(16)
    x *= _f16(blocks[:, 0:2])
    return x


def unpack_q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins, one pair per 32-weight sub-block.

    bytes 0-3:  scale[0..3] in bits 0-5, bits 4-5 of scale[4..7] in bits 6-7
    bytes 4-7:  min[0..3]   in bits 0-5, bits 4-5 of min[4..7]   in bits 6-7
    bytes 8-11: bits 0-3 of scale[4..7] in the low nibble, of min[4..7] in the high nibble
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale_hi = (c & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))
    min_hi = (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))
    scales = np.concatenate([a & np.uint8(0x3F), scale_hi], axis=1)
    mins = np.concatenate([b & np.uint8(0x3F), min_hi], axis=1)
    return scales, mins


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    # [0:2] d fp16 | [2:4] dmin fp16 | [4:16] 8 scales + 8 mins, 6 bits each |
    # [16:144] 128 bytes of nibbles: 4 groups of 32 bytes, group g holds sub-block 2g in the low
    # nibbles and sub-block 2g+1 in the high nibbles;  x = (d * scale) * q - (dmin * min)
    n = len(blocks)
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    scales, mins = unpack_q4_k_scales(blocks[:, 4:16])
    sub_scale = (d * scales.astype(np.float32)).reshape(n, 8, 1)
    sub_min = (dmin * mins.astype(np.float32)).reshape(n, 8, 1)
    low, high = _split_nibbles(blocks[:, 16:].reshape(n, 4, 1, 32))
    q = np.concatenate([low, high], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (sub_scale * q - sub_min).reshape(n, QK_K)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    # [0:128] ql: low 4 bits | [128:192] qh: high 2 bits | [192:208] scale int8[16] (one per 16
    # weights) | [208:210] d fp16.  Each half of 128 weights uses 64 ql bytes and 32 qh bytes:
    # weights 0-31 / 32-63 take the low nibbles of ql[0:32] / ql[32:64], weights 64-95 / 96-127
    # the high nibbles; qh byte l holds the top 2 bits of weights l, l+32, l+64, l+96.
    # x = (d * scale) * (q - 32)
    n = len(blocks)
    low, high = _split_nibbles(blocks[:, 0:128].reshape(n, 2, 64))
    q_low = np.concatenate([low, high], axis=2)  # (n, 2, 128)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q_high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & np.uint8(0x03)
    q = (q_low | (q_high.reshape(n, 2, 128) << np.uint8(4))).astype(np.int8) - np.int8(32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    sub_scale = (d * scales).reshape(n, 16, 1)
    return (sub_scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _dequantize_f32,
    "F16": _dequantize_f16,
    "BF16": _dequantize_bf16,
    "Q8_0": _dequantize_q8_0,
    "Q4_0": _dequantize_q4_0,
    "Q4_1": _dequantize_q4_1,
    "Q5_0": _dequantize_q5_0,
    "Q4_K": _dequantize_q4_k,
    "Q6_K": _dequantize_q6_k,
}


def dequantize(t: QuantTensor) -> np.ndarray:
    """fp32 values of a QuantTensor, shaped ``t.shape`` (a new array, never a view of t.data)."""
    elems, nbytes = _check_format(t.format)
    blocks = np.ascontiguousarray(t.data).reshape(-1, nbytes)
    out = np.empty((len(blocks), elems), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // elems)
    for start in range(0, len(blocks), step):
        out[start : start + step] = _DEQUANTIZERS[t.format](blocks[start : start + step])
    return out.reshape(t.shape)


# ---------------------------------------------------------------------------------------------
# Quantizers: values (n, elements per block) float32 -> blocks (n, bytes per block) uint8
# ---------------------------------------------------------------------------------------------


def _quantize_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _quantize_f16(x: np.ndarray) -> np.ndarray:
    h = x.astype("<f2")
    if not np.isfinite(h).all():
        raise ValueError("F16: values too large to quantize: |x| > 65504 overflows fp16")
    return h.view(np.uint8)


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    # Keep the top 16 bits of each float32, rounding to nearest even; a NaN stays a (quiet) NaN
    # instead of rounding into infinity. Same rule as ggml_compute_fp32_to_bf16.
    bits = x.view(np.uint32)
    top = bits >> np.uint32(16)
    rounded = (bits + (np.uint32(0x7FFF) + (top & np.uint32(1)))) >> np.uint32(16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(is_nan, top | np.uint32(0x40), rounded).astype("<u2").view(np.uint8)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    # d = max|x| / 127, q = roundf(x / d): the largest magnitude lands on +-127.
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(x * _reciprocal(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d, "Q8_0"), q.view(np.uint8)], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: q[j] in the low nibble, q[j+16] in the high one."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    # The signed value of largest magnitude maps to -8 (the one level that has no +8 twin),
    # so d = that value / -8 and q = trunc(x / d + 8.5) clipped to 0..15.
    biggest = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)
    d = biggest / np.float32(-8)
    q = np.trunc(x * _reciprocal(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_f16_bytes(d, "Q4_0"), _pack_nibbles(q)], axis=1)


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    # 16 levels spread from the block's min to its max: d = (max - min) / 15, m = min.
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = np.trunc((x - lo) * _reciprocal(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_f16_bytes(d, "Q4_1"), _f16_bytes(lo, "Q4_1"), _pack_nibbles(q)], axis=1)


def _quantize_q5_0(x: np.ndarray) -> np.ndarray:
    # Q4_0 with one more bit: the signed value of largest magnitude maps to -16, so
    # d = that value / -16 and q = trunc(x / d + 16.5) clipped to 0..31. The low 4 bits of q are
    # packed as Q4_0's nibbles, the 5th bits of the 32 weights go into one uint32 (qh).
    biggest = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)
    d = biggest / np.float32(-16)
    q = np.trunc(x * _reciprocal(d) + np.float32(16.5)).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> np.uint8(4), axis=1, bitorder="little")  # (n, 4)
    qs = _pack_nibbles(q & np.uint8(0x0F))
    return np.concatenate([_f16_bytes(d, "Q5_0"), qh, qs], axis=1)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b) over the last axis (..., 1), as float64 for the least-squares algebra below."""
    return np.einsum("...i,...i->...", a, b).astype(np.float64)[..., None]


def _row_sum(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=-1, keepdims=True).astype(np.float64)


def _fit_scale_and_min(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit x ~ scale * q - offset, q in 0..nmax, per row of x (..., n).

    As llama.cpp's make_qkx2_quants: minimize sum w * err^2 with llama.cpp's weights
    w = rms(x) + |x|, trying 21 grid spacings around (max - min) / nmax and, for each rounding,
    solving the weighted least squares for (scale, offset). The offset is kept >= 0 (the min is
    clamped to <= 0) because Q4_K stores it unsigned. Works on x / max|x|, so tiny and huge
    values fit equally well.
    """
    amax = np.abs(x).max(axis=-1, keepdims=True)
    unit = np.where(amax > 0, amax, np.float32(1))
    y = x / unit
    w = np.sqrt((y * y).mean(axis=-1, keepdims=True)) + np.abs(y)
    lo = np.minimum(y.min(axis=-1, keepdims=True), 0)
    span = y.max(axis=-1, keepdims=True) - lo
    sw, swy, swyy = _row_sum(w), _row_dot(w, y), _row_dot(w * y, y)

    def weighted_error(
        scale: np.ndarray, m: np.ndarray, sq: np.ndarray, sqq: np.ndarray, sqy: np.ndarray
    ) -> np.ndarray:
        # sum w * (scale*q + m - y)^2, expanded so that only the sums above are needed
        return (
            scale * scale * sqq + 2 * scale * m * sq - 2 * scale * sqy
            + m * m * sw - 2 * m * swy + swyy
        )  # fmt: skip

    best_scale, best_min = span / nmax, lo  # the plain min/max fit to start with
    q = np.clip(np.rint((y - lo) * _reciprocal(best_scale)), 0, nmax)
    wq = w * q
    best_err = weighted_error(best_scale, best_min, _row_sum(wq), _row_dot(wq, q), _row_dot(wq, y))
    for step in range(21):
        q = np.clip(np.rint((y - lo) * ((nmax - 1 + 0.1 * step) * _reciprocal(span))), 0, nmax)
        wq = w * q
        sq, sqq, sqy = _row_sum(wq), _row_dot(wq, q), _row_dot(wq, y)
        det = sw * sqq - sq * sq
        ok = det > 0
        safe_det = np.where(ok, det, 1)
        scale = (sw * sqy - swy * sq) / safe_det
        m = (sqq * swy - sq * sqy) / safe_det
        positive_min = m > 0  # refit with the min pinned at 0
        scale = np.where(positive_min, sqy / np.where(sqq > 0, sqq, 1), scale)
        m = np.where(positive_min, 0, m)
        err = weighted_error(scale, m, sq, sqq, sqy)
        better = ok & (err < best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, m, best_min)
        best_err = np.where(better, err, best_err)
    scale = (np.maximum(best_scale, 0) * unit).astype(np.float32)
    offset = (-best_min * unit).astype(np.float32)
    return scale[..., 0], offset[..., 0]


def _fp16_at_least(v: np.ndarray) -> np.ndarray:
    """v rounded to an fp16 of equal or larger magnitude (as float32).

    A super-block factor rounded *down* would push the largest sub-block scale past the top
    integer and clip it; rounding away from zero never does.
    """
    h = v.astype(np.float16)
    away = np.copysign(np.float32(np.inf), v).astype(np.float16)
    h = np.where(np.abs(h) < np.abs(v), np.nextafter(h, away), h)
    return h.astype(np.float32)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    # 8 sub-blocks of 32: each gets its own (scale, min) fit, then the 8 scales and the 8 mins
    # are themselves quantized to 6 bits against the super-block's d and dmin (fp16). The 4-bit
    # weights are finally rounded with the scales *as stored*, so dequantization sees no drift.
    n = len(x)
    sub = x.reshape(n, 8, 32)
    scale, offset = _fit_scale_and_min(sub, 15)
    d = _fp16_at_least(scale.max(axis=1, keepdims=True) / np.float32(63))
    dmin = _fp16_at_least(offset.max(axis=1, keepdims=True) / np.float32(63))
    header = np.concatenate([_f16_bytes(d, "Q4_K"), _f16_bytes(dmin, "Q4_K")], axis=1)
    scales = np.clip(np.rint(scale * _reciprocal(d)), 0, 63).astype(np.uint8)
    mins = np.clip(np.rint(offset * _reciprocal(dmin)), 0, 63).astype(np.uint8)
    sub_scale = (d * scales.astype(np.float32))[:, :, None]
    sub_min = (dmin * mins.astype(np.float32))[:, :, None]
    q = np.clip(np.rint((sub + sub_min) * _reciprocal(sub_scale)), 0, 15).astype(np.uint8)

    packed_scales = np.concatenate(
        [
            scales[:, :4] | ((scales[:, 4:] >> 4) << 6),
            mins[:, :4] | ((mins[:, 4:] >> 4) << 6),
            (scales[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    ).astype(np.uint8)
    pairs = q.reshape(n, 4, 2, 32)  # sub-blocks (0,1), (2,3), ... share 32 bytes
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << np.uint8(4))).reshape(n, 128)
    return np.concatenate([header, packed_scales, nibbles], axis=1)


def _fit_symmetric_scale(x: np.ndarray, nmax: int) -> np.ndarray:
    """Fit x ~ scale * q, q in -nmax..nmax-1, per row of x (..., n).

    As llama.cpp's make_qx_quants (rmse_type 1): the value of largest magnitude maps to -nmax;
    try 19 spacings around it and keep the one whose least-squares scale explains most of x,
    weighting each weight by x^2 (big weights matter most). Works on x / max|x|.
    """
    biggest = np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)
    unit = np.where(biggest != 0, np.abs(biggest), np.float32(1))
    y, peak = x / unit, biggest / unit
    w = y * y
    best_scale = np.zeros(peak.shape, dtype=np.float64)
    best_fit = np.full(peak.shape, -1.0)
    for step in [0, *range(-9, 0), *range(1, 10)]:
        q = np.clip(np.rint(y * (-(nmax + 0.1 * step) * _reciprocal(peak))), -nmax, nmax - 1)
        wq = w * q
        sqy, sqq = _row_dot(wq, y), _row_dot(wq, q)
        scale = sqy / np.where(sqq > 0, sqq, 1)
        fit = scale * sqy  # = sum w*y^2 minus the weighted squared error of this rounding
        better = (sqq > 0) & (fit > best_fit)
        best_scale = np.where(better, scale, best_scale)
        best_fit = np.where(better, fit, best_fit)
    return (best_scale * unit).astype(np.float32)[..., 0]


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    # 16 sub-blocks of 16: each gets a signed scale, then the 16 scales are quantized to int8
    # against the super-block's d (fp16), the largest one landing on -128. The 6-bit weights are
    # rounded with the scales as stored.
    n = len(x)
    sub = x.reshape(n, 16, 16)
    scale = _fit_symmetric_scale(sub, 32)
    biggest = np.take_along_axis(scale, np.abs(scale).argmax(axis=1, keepdims=True), axis=1)
    d = _fp16_at_least(np.where(biggest != 0, biggest / np.float32(-128), np.float32(0)))
    d_bytes = _f16_bytes(d, "Q6_K")
    scales = np.clip(np.rint(scale * _reciprocal(d)), -128, 127).astype(np.int8)
    sub_scale = (d * scales.astype(np.float32))[:, :, None]
    q = np.clip(np.rint(sub * _reciprocal(sub_scale)), -32, 31).astype(np.int8)
    q = (q + np.int8(32)).astype(np.uint8).reshape(n, 2, 4, 32)  # halves x quarters x 32

    low, high = q & np.uint8(0x0F), q >> np.uint8(4)
    ql = np.concatenate(
        [low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2
    ).reshape(n, 128)
    qh = (
        high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    ).reshape(n, 64)
    return np.concatenate([ql, qh, scales.view(np.uint8), d_bytes], axis=1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _quantize_f32,
    "F16": _quantize_f16,
    "BF16": _quantize_bf16,
    "Q8_0": _quantize_q8_0,
    "Q4_0": _quantize_q4_0,
    "Q4_1": _quantize_q4_1,
    "Q5_0": _quantize_q5_0,
    "Q4_K": _quantize_q4_k,
    "Q6_K": _quantize_q6_k,
}


def quantize(values: np.ndarray, fmt: str) -> QuantTensor:
    """Store float values (any shape, last axis = rows of whole blocks) in format ``fmt``.

    Values are taken as float32 first, as llama.cpp does. F16, BF16, Q8_0, Q4_0, Q4_1 and Q5_0
    give the same bytes as gguf-py's quantizers (which follow llama.cpp's reference rounding);
    Q4_K and Q6_K use our own version of llama.cpp's scale search (same layout, other bytes).
    NaN/Inf in a block format, or values whose fp16 scale would overflow, raise ValueError
    (gguf would silently store an infinite scale).
    """
    elems, nbytes = _check_format(fmt)
    values = np.asarray(values)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"quantize needs real numbers, got an array of dtype {values.dtype}")
    if values.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension, got a scalar")
    row_bytes = bytes_per_row(fmt, values.shape[-1])
    x = np.ascontiguousarray(values, dtype=np.float32)
    if fmt not in ("F32", "F16", "BF16") and not np.isfinite(x).all():
        raise ValueError(f"{fmt}: cannot quantize NaN or infinite values (no block scale fits)")
    blocks = x.reshape(-1, elems)
    out = np.empty((len(blocks), nbytes), dtype=np.uint8)
    with np.errstate(over="ignore"):  # fp16 overflow is reported by _f16_bytes/_quantize_f16
        step = max(1, _CHUNK_ELEMENTS // elems)
        for start in range(0, len(blocks), step):
            out[start : start + step] = _QUANTIZERS[fmt](blocks[start : start + step])
    rows = int(np.prod(values.shape[:-1], dtype=np.int64)) if values.ndim > 1 else 1
    return QuantTensor(fmt, out.reshape(rows, row_bytes), values.shape)
