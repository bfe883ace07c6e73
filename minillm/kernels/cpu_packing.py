"""Repack GGUF blocks once at load time into arrays the Numba kernels read fast.

The kernels compute on quantized weights directly, so the repacked weight keeps (about) the
bytes of the file: 4-bit codes stay 4-bit, fp16 block scales stay fp16 (decoded inside the
kernel). Only the *arrangement* changes. A GGUF row is an array of structs (one 20-byte Q4_1
block after another); here codes and scales become separate plain arrays, and the rows of a
4-bit matrix are *interleaved* in panels of ``PANEL`` = 16 (llama.cpp's repacked "Q4_0_8x8"
layouts use the same idea): byte j of block b of the panel's 16 rows lie side by side, so one
load brings one weight column of 16 rows. The kernels (``cpu_q4``) compute the 16 rows' outputs
at once in the lanes of one SIMD register, with no horizontal sums, and one decoded column
serves every token of a batch. Rows are padded to a multiple of 16 with zero codes and scales
(the padded outputs are never stored). int8 and float weights stay row-major (see
``cpu_linear`` for why).

Three kernel families cover every format:

- ``q4``: 32 weights per block, 16 bytes of codes (weight j in the low nibble of byte j,
  weight j+16 in the high nibble, as Q4_0/Q4_1 store them), value = scale * q + mult * offset.
  Q4_0 (offset = scale, mult = -8), Q4_1 (offset = m, mult = 1) and Q4_K (sub-block scales
  and mins of its 256-weight super-blocks turned into fp32, mult = -1).
- ``q8``: int8 codes with one scale per block: Q8_0 (32 per block, fp16 scale), Q5_0 (32 per
  block, fp16 scale; its 5-bit codes minus 16 fit in int8: exact, but 8.5 bits per weight
  instead of 5.5) and Q6_K (16 per block, fp32 scale d * sc; the 6-bit codes minus 32 fit in
  int8: exact, but 10 bits per weight instead of 6.56). Q5_0 and Q6_K are a
  widen-to-int8-at-load compromise: one kernel family fewer, at the cost of memory traffic.
- ``float``: F32 as float32; F16 and BF16 stay 16-bit and are widened inside the kernel.
  Row-major, not in panels: these are the small or unquantized models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor

Q4_FORMATS = ("Q4_0", "Q4_1", "Q4_K")
Q8_FORMATS = ("Q8_0", "Q5_0", "Q6_K")
FLOAT_FORMATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class PackedWeight:
    """A (rows, cols) weight matrix laid out for one kernel family.

    ``codes``: q4 uint8 (panels, cols/32, 16, PANEL), [p, b, j, r] = byte j of block b of row
    PANEL * p + r; q8 int8 (rows, cols); q8_panels int8 (panels, cols/32, 8, 4 * PANEL),
    [p, b, g, 4r + k] = weight 4g + k of block b of row PANEL * p + r; float float32 or uint16
    (rows, cols). ``scale``/``offset``: per block, uint16 fp16 bits or float32: q4 (panels,
    cols/32, PANEL), q8 (rows, cols/block), q8_panels (panels, cols/block, PANEL); ``offset``
    only for q4 (an empty array otherwise).
    """

    format: str  # the GGUF format it came from
    kind: str  # "q4", "q8", "q8_panels" or "float"
    rows: int
    cols: int
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    offset_mult: float = 1.0  # q4: value = scale * q + offset_mult * offset
    block: int = 32  # q8: weights per scale
    is_bf16: bool = False  # float kind with uint16 codes: BF16 (else F16)
    int8_activations: bool = False  # matmuls quantize x to int8 blocks (``cpu_a8``)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @cached_property
    def kernel_args(self) -> tuple:
        """The arrays and constants ``cpu_linear.matmul`` takes, in its order (built once)."""
        return (
            self.codes,
            self.scale,
            self.offset,
            self.offset_mult,
            self.block,
            self.is_bf16,
            self.int8_activations,
        )

    @cached_property
    def layer_args(self) -> tuple:
        """(rows, *kernel_args): what the fused decode layer takes per weight (the codes'
        shape does not tell the row count: q4 rows are padded to whole panels)."""
        return (self.rows, *self.kernel_args)

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams to read the whole matrix once (Q4_0 shares scale/offset)."""
        extra = 0 if self.offset is self.scale else self.offset.nbytes
        return int(self.codes.nbytes + self.scale.nbytes + extra)


_EMPTY = np.zeros((0, 0), dtype=np.float32)
PANEL = 16  # q4 rows interleaved together: 16 float32 outputs fill one AVX-512 register


def _panels(per_row: np.ndarray, rows: int) -> np.ndarray:
    """(rows, blocks, ...) -> (panels, blocks, ..., PANEL): rows padded with zeros to a
    multiple of PANEL, then each panel's rows moved to the last (fastest) axis."""
    padded_rows = -(-rows // PANEL) * PANEL
    padded = np.zeros((padded_rows, *per_row.shape[1:]), per_row.dtype)
    padded[:rows] = per_row
    split = padded.reshape(padded_rows // PANEL, PANEL, *per_row.shape[1:])
    return np.ascontiguousarray(np.moveaxis(split, 1, -1))


def _q4_weight(
    fmt: str,
    rows: int,
    cols: int,
    codes: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray | None,
    offset_mult: float,
) -> PackedWeight:
    """Row-major q4 arrays (codes (rows, cols/32, 16), scale/offset (rows, cols/32)) ->
    the panel-interleaved PackedWeight. ``offset`` None: the offset is the scale (Q4_0)."""
    scale_p = _panels(scale, rows)
    offset_p = scale_p if offset is None else _panels(offset, rows)
    return PackedWeight(fmt, "q4", rows, cols, _panels(codes, rows), scale_p, offset_p,
                        offset_mult=offset_mult)  # fmt: skip


def _f16_bits(field: np.ndarray) -> np.ndarray:
    """(..., 2) little-endian bytes -> (...) uint16 fp16 bit patterns."""
    return np.ascontiguousarray(field).view("<u2")[..., 0].astype(np.uint16)


def _f16_values(field: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(field).view("<f2")[..., 0].astype(np.float32)


def _pack_q4_0_1(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    blocks = t.data.reshape(rows, cols // 32, -1)
    scale = _f16_bits(blocks[:, :, 0:2])
    if t.format == "Q4_0":  # [d fp16][16 bytes of codes]; value = d * q - 8 * d
        return _q4_weight(t.format, rows, cols, blocks[:, :, 2:18], scale, None, -8.0)
    offset = _f16_bits(blocks[:, :, 2:4])  # [d fp16][m fp16][16 bytes]; value = d * q + m
    return _q4_weight(t.format, rows, cols, blocks[:, :, 4:20], scale, offset, 1.0)


def _pack_q4_k(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    from minillm.formats.blocks import unpack_q4_k_scales  # the layout lives there, once

    blocks = t.data.reshape(-1, 144)
    n = len(blocks)
    d, dmin = _f16_values(blocks[:, 0:2]), _f16_values(blocks[:, 2:4])
    sc, mn = unpack_q4_k_scales(blocks[:, 4:16])  # (n, 8) six-bit integers
    scale = d[:, None] * sc.astype(np.float32)  # exact: 11-bit mantissa x 6-bit integer
    offset = dmin[:, None] * mn.astype(np.float32)
    # codes: 4 groups of 32 bytes; group g holds sub-block 2g (low nibbles) and 2g+1 (high).
    groups = blocks[:, 16:].reshape(n, 4, 32)
    sub = np.stack([groups & 0x0F, groups >> 4], axis=2).reshape(n, 8, 32)  # (n, 8, 32) 0..15
    codes = (sub[:, :, :16] | (sub[:, :, 16:] << 4)).astype(np.uint8)  # Q4_1's nibble order
    return _q4_weight(t.format, rows, cols, codes.reshape(rows, cols // 32, 16),
                      scale.reshape(rows, -1), offset.reshape(rows, -1), -1.0)  # fmt: skip


def _pack_q8_0(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    blocks = t.data.reshape(rows, cols // 32, 34)  # [d fp16][32 x int8]
    codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return PackedWeight(t.format, "q8", rows, cols, codes, _f16_bits(blocks[:, :, 0:2]), _EMPTY)


def _pack_q5_0(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    # [d fp16][qh: 5th bit of weight j = bit j of a little-endian uint32][16 bytes of low
    # nibbles, Q4_0's order]; value = d * (q - 16), q - 16 in -16..15: Q8_0's kernel as is
    blocks = t.data.reshape(rows, cols // 32, 22)
    high = np.unpackbits(blocks[:, :, 2:6], axis=2, bitorder="little")  # (rows, nb, 32) 0/1
    qs = blocks[:, :, 6:22]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (rows, nb, 32) 0..15
    codes = ((low | (high << 4)).astype(np.int16) - 16).astype(np.int8).reshape(rows, cols)
    return PackedWeight(t.format, "q8", rows, cols, codes, _f16_bits(blocks[:, :, 0:2]), _EMPTY)


def _pack_q6_k(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    # [0:128] ql low 4 bits | [128:192] qh high 2 bits | [192:208] int8 scale per 16 | d fp16
    blocks = t.data.reshape(-1, 210)
    n = len(blocks)
    low = blocks[:, 0:128].reshape(n, 2, 64)
    ql = np.concatenate([low & 0x0F, low >> 4], axis=2)  # (n, 2 halves, 128)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 2, 128)
    codes = ((ql | (qh << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, cols)
    d = _f16_values(blocks[:, 208:210])
    scale = d[:, None] * blocks[:, 192:208].view(np.int8).astype(np.float32)  # exact
    return PackedWeight(
        t.format, "q8", rows, cols, codes, scale.reshape(rows, -1), _EMPTY, block=16
    )


def _pack_float(t: QuantTensor, rows: int, cols: int) -> PackedWeight:
    raw = np.ascontiguousarray(t.data)
    if t.format == "F32":
        codes = raw.view("<f4").astype(np.float32, copy=False).reshape(rows, cols)
    else:
        codes = raw.view("<u2").astype(np.uint16, copy=False).reshape(rows, cols)
    return PackedWeight(
        t.format, "float", rows, cols, codes, _EMPTY, _EMPTY, is_bf16=t.format == "BF16"
    )


_PACKERS = {
    "Q4_0": _pack_q4_0_1,
    "Q4_1": _pack_q4_0_1,
    "Q4_K": _pack_q4_k,
    "Q8_0": _pack_q8_0,
    "Q5_0": _pack_q5_0,
    "Q6_K": _pack_q6_k,
    "F32": _pack_float,
    "F16": _pack_float,
    "BF16": _pack_float,
}


def _q8_panels(w: PackedWeight) -> PackedWeight:
    """A row-major q8 weight in 16-row panels for the int8-activation kernels: per block of
    32 and group of 4 weights, the 16 rows' 4 bytes side by side (``vpdpbusd``'s lanes)."""
    padded_rows = -(-w.rows // PANEL) * PANEL
    codes = np.zeros((padded_rows, w.cols), np.int8)
    codes[: w.rows] = w.codes
    grouped = codes.reshape(padded_rows // PANEL, PANEL, w.cols // 32, 8, 4)
    panels = np.ascontiguousarray(grouped.transpose(0, 2, 3, 1, 4)).reshape(
        padded_rows // PANEL, w.cols // 32, 8, 4 * PANEL
    )
    return PackedWeight(w.format, "q8_panels", w.rows, w.cols, panels, _panels(w.scale, w.rows),
                        _EMPTY, block=w.block, int8_activations=True)  # fmt: skip


def pack_weight(t: QuantTensor, int8_activations: bool = False) -> PackedWeight:
    """QuantTensor (rows, cols) -> PackedWeight for the cpu kernels (done once, at load).

    int8_activations: the matmuls will quantize x to int8 (W4A8/W8A8, ``cpu_a8``); q4 weights
    keep their layout, int8 ones move to panels; float weights ignore it (they compute in
    fp32)."""
    if not isinstance(t, QuantTensor):
        raise TypeError(f"pack_weight needs a QuantTensor, got {type(t).__name__}")
    if t.format not in _PACKERS:
        raise ValueError(
            f"the cpu backend cannot compute on {t.format!r} weights; supported: {sorted(_PACKERS)}"
        )
    if len(t.shape) != 2:
        raise ValueError(f"a weight matrix must be 2-D (rows, cols), got shape {t.shape}")
    rows, cols = t.shape
    if t.format not in FLOAT_FORMATS and cols % BLOCK_LAYOUT[t.format][0]:
        raise ValueError(f"{t.format}: {cols} columns are not whole blocks")
    packed = _PACKERS[t.format](t, rows, cols)
    if not int8_activations or packed.kind == "float":
        return packed
    if packed.kind == "q8":
        return _q8_panels(packed)
    return replace(packed, int8_activations=True)
