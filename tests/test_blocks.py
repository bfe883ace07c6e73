"""GGUF block formats: our (de)quantizers against the `gguf` package's own, bit for bit.

gguf-py's numpy code is the reference: its block sizes, its dequantizer for every format, and
its quantizer for the formats it implements. For Q4_K and Q6_K, which gguf cannot quantize,
ours is checked by its error and by gguf reading our bytes back to the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quant_shape_to_byte_shape
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm.formats.blocks import (
    BLOCK_LAYOUT,
    QuantTensor,
    bytes_per_row,
    dequantize,
    quantize,
)
from minillm.formats.gguf import GGUFFile

FORMATS = list(BLOCK_LAYOUT)
GGUF_QUANTIZES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]  # checked below
K_QUANTS = ["Q4_K", "Q6_K"]
# byte offsets of the fp16 scale fields inside one block
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def gguf_type(fmt: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[fmt]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of float32 arrays: tells -0.0 from 0.0 and compares NaNs by payload."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def gguf_bytes(values: np.ndarray, fmt: str) -> np.ndarray:
    """gguf's quantization of values as raw bytes (F32/F16 come back as float arrays)."""
    out = np.asarray(gguf_quantize(values, gguf_type(fmt)))
    return out.view(np.uint8).reshape(len(values), -1)


def relative_rms_error(values: np.ndarray, fmt: str) -> float:
    back = dequantize(quantize(values, fmt))
    return float(np.sqrt(np.mean((back - values) ** 2) / np.mean(values**2)))


# --- layout ---------------------------------------------------------------------------------


def test_block_sizes_are_llama_cpps():
    # bytes of each block, summed from the fields of llama.cpp's structs in ggml-common.h
    fields = {
        "Q8_0": 2 + 32,  # d, qs[32]
        "Q4_0": 2 + 16,  # d, qs[16]
        "Q4_1": 2 + 2 + 16,  # d, m, qs[16]
        "Q5_0": 2 + 4 + 16,  # d, qh[4], qs[16]
        "Q4_K": 2 + 2 + 12 + 128,  # d, dmin, scales[12], qs[128]
        "Q6_K": 128 + 64 + 16 + 2,  # ql, qh, scales, d
    }
    assert fields == {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q4_K": 144, "Q6_K": 210}
    for fmt, (elems, nbytes) in BLOCK_LAYOUT.items():
        assert GGML_QUANT_SIZES[gguf_type(fmt)] == (elems, nbytes), fmt
        if fmt in fields:
            assert nbytes == fields[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_per_row_and_bits_per_weight(fmt: str):
    elems, _ = BLOCK_LAYOUT[fmt]
    for n in (elems, 4 * elems, 1024):
        want = quant_shape_to_byte_shape((3, n), gguf_type(fmt))[-1]
        assert bytes_per_row(fmt, n) == want
    t = quantize(np.zeros((2, 4 * elems), np.float32), fmt)
    assert t.bits_per_weight == 8 * t.nbytes / t.n_elements


def test_which_formats_gguf_can_quantize():
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for fmt in GGUF_QUANTIZES:
        assert gguf_bytes(x, fmt).shape == (2, bytes_per_row(fmt, 256))
    for fmt in K_QUANTS:  # if this starts to pass, add them to the byte-exact tests
        with pytest.raises(NotImplementedError):
            gguf_quantize(x, gguf_type(fmt))


# --- dequantize: ours == gguf's on any bytes ------------------------------------------------


def random_blocks(raw: np.ndarray, fmt: str) -> np.ndarray:
    """Random bytes, with every fp16 scale made finite (an Inf/NaN scale is not a real block)."""
    _, nbytes = BLOCK_LAYOUT[fmt]
    blocks = raw.reshape(-1, nbytes)
    for offset in FP16_FIELDS.get(fmt, []):
        half = blocks[:, offset : offset + 2].view("<u2")
        half[(half & 0x7C00) == 0x7C00] ^= 0x4000  # exponent 31 (Inf/NaN) -> 15
    return raw


@st.composite
def block_tensors(draw: st.DrawFn, fmt: str) -> QuantTensor:
    elems, nbytes = BLOCK_LAYOUT[fmt]
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    per_row = draw(st.integers(1, 3 if elems > 1 else 40))
    rows = int(np.prod(lead, dtype=np.int64))
    raw = draw(arrays(np.uint8, (rows, per_row * nbytes)))
    return QuantTensor(fmt, random_blocks(raw, fmt), (*lead, per_row * elems))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dequantize_equals_gguf_on_random_blocks(fmt: str, data: st.DataObject):
    t = data.draw(block_tensors(fmt))
    ours = dequantize(t)
    ref = np.asarray(gguf_dequantize(t.data, gguf_type(fmt))).reshape(t.shape)
    assert ours.shape == t.shape
    assert same_bits(ours, ref)


def test_dequantize_returns_a_new_array():
    t = quantize(np.arange(8, dtype=np.float32), "F32")
    out = t.dequantize()
    out[0] = 42.0
    assert t.dequantize()[0] == 0.0


def test_take_rows_selects_whole_rows():
    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    t = quantize(x, "Q4_1")
    rows = np.array([4, 0, 4, 2])
    assert same_bits(t.take_rows(rows).dequantize(), t.dequantize()[rows])


# --- quantize: ours == gguf's, byte for byte ------------------------------------------------


def edge_blocks() -> np.ndarray:
    """Blocks of 32 that poke at the rounding rules, each padded to a 256-weight row."""
    ties = np.concatenate([[127.0], np.arange(-15.5, 15.5, 1.0)])  # x/d lands on halves (Q8_0)
    cases = [
        np.zeros(32),
        np.full(32, 0.75),
        np.full(32, -3.0),
        np.r_[np.zeros(31), 5.0],  # one spike
        np.r_[np.zeros(31), -5.0],
        ties,
        -ties,
        np.linspace(-8, 7, 32),  # Q4_0's grid when the extreme value is -8
        np.linspace(-16, 15, 32),  # Q5_0's grid when the extreme value is -16
        np.r_[-16.0, 16.0, np.zeros(30)],  # +16 lands past the top code (16.5 -> 31 in Q4_0)
        np.r_[np.zeros(30), 16.0, -16.0],  # the first of two equal magnitudes sets the sign
        np.linspace(-1, 1, 32) * 1e-20,  # scale underflows fp16
        np.linspace(-1, 1, 32) * 1e-7,
        np.linspace(-3e4, 3e4, 32),  # scales near the top of fp16
        np.r_[np.full(16, -0.0), np.full(16, 0.0)],
    ]
    blocks = np.concatenate(cases).astype(np.float32)
    return np.resize(blocks, (len(cases), 256))


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES)
def test_quantize_equals_gguf_on_edge_cases(fmt: str):
    x = edge_blocks()
    assert np.array_equal(quantize(x, fmt).data, gguf_bytes(x, fmt))


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES)
@pytest.mark.parametrize("magnitude", [1e-20, 1e-6, 0.02, 1.0, 1e3])
def test_quantize_equals_gguf_on_normal_data(fmt: str, magnitude: float):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 512)) * magnitude).astype(np.float32)
    assert np.array_equal(quantize(x, fmt).data, gguf_bytes(x, fmt))


@st.composite
def float_rows(draw: st.DrawFn, elems: int) -> np.ndarray:
    """Rows of whole blocks; each block has its own magnitude, 1e-20 .. 1e4."""
    n_blocks = draw(st.integers(1, 3))
    unit = arrays(np.float32, n_blocks * elems, elements=st.floats(-1, 1, width=32))
    x = draw(unit).reshape(n_blocks, elems)
    exponents = draw(arrays(np.int64, (n_blocks, 1), elements=st.integers(-20, 4)))
    x = (x * np.float32(10.0) ** exponents.astype(np.float32)).astype(np.float32)
    x[np.abs(x) < 1e-30] = 0  # no subnormal block maxima: 1/d would overflow
    return x.reshape(1, -1)


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_quantize_equals_gguf_on_random_values(fmt: str, data: st.DataObject):
    x = data.draw(float_rows(32))
    assert np.array_equal(quantize(x, fmt).data, gguf_bytes(x, fmt))


def test_q5_0_block_layout_by_hand():
    # x = q - 16 for q = 0..31: d = -16 / -16 = 1 and the codes come back as 0..31. The 5th
    # bits (set for q >= 16, i.e. weights 16..31) form the little-endian uint32 0xFFFF0000;
    # byte j of qs holds weight j's low nibble and weight j+16's in its high nibble.
    x = (np.arange(32) - 16).astype(np.float32)
    block = quantize(x, "Q5_0").data[0]
    assert block.shape == (22,)
    assert block[0:2].view("<f2")[0] == 1.0
    assert block[2:6].view("<u4")[0] == 0xFFFF0000
    assert np.array_equal(block[6:22], np.arange(16, dtype=np.uint8) * np.uint8(0x11))
    assert np.array_equal(dequantize(quantize(x, "Q5_0")), x)


def test_q5_0_sits_between_q4_0_and_q8_0():
    # One more bit than Q4_0 halves the grid step: the error drops by about 2x.
    x = np.random.default_rng(4).standard_normal((16, 1024)).astype(np.float32)
    q4, q5, q8 = (relative_rms_error(x, f) for f in ("Q4_0", "Q5_0", "Q8_0"))
    assert q8 < q5 < 0.6 * q4


def test_bf16_keeps_nan_and_inf_like_gguf():
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -0.0, 1.00390625, 1.01171875]])
    # signalling NaNs whose top 16 bits alone would read as +-Inf: they must stay NaN
    quiet_bit_off = np.array([[0x7F800001, 0xFF800001, 0x7F80FFFF]], np.uint32).view(np.float32)
    x = np.concatenate([x.astype(np.float32), quiet_bit_off], axis=1)
    ours = quantize(x, "BF16")
    assert np.array_equal(ours.data, gguf_bytes(x, "BF16"))
    assert np.array_equal(np.isnan(ours.dequantize()), np.isnan(x))


# --- Q4_K / Q6_K: our own quantizers --------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gguf_reads_our_bytes_as_we_do(fmt: str, data: st.DataObject):
    x = data.draw(float_rows(256))
    t = quantize(x, fmt)
    ref = np.asarray(gguf_dequantize(t.data, gguf_type(fmt))).reshape(t.shape)
    assert same_bits(dequantize(t), ref)


# relative RMS error bounds; measured on 64x1024 samples: Q4_K 0.072 / Q6_K 0.018 (normal),
# 0.093 / 0.026 (Student t, 3 dof)
K_BOUNDS = {"Q4_K": (0.08, 0.10), "Q6_K": (0.02, 0.03)}


@pytest.mark.parametrize("fmt", K_QUANTS)
@pytest.mark.parametrize("magnitude", [1e-4, 0.02, 1.0, 1e4])
def test_k_quant_error_is_small(fmt: str, magnitude: float):
    rng = np.random.default_rng(3)
    normal = (rng.standard_normal((16, 1024)) * magnitude).astype(np.float32)
    heavy = (rng.standard_t(3, (16, 1024)) * magnitude).astype(np.float32)
    normal_bound, heavy_bound = K_BOUNDS[fmt]
    assert relative_rms_error(normal, fmt) < normal_bound
    assert relative_rms_error(heavy, fmt) < heavy_bound


def test_q4_k_beats_q4_1_on_centred_weights():
    # Q4_K spends 4.5 bits per weight against Q4_1's 5, yet fits centred data better, thanks to
    # its least-squares scale search (llama.cpp's reason for the K formats).
    rng = np.random.default_rng(5)
    for x in (rng.standard_normal((16, 1024)), rng.laplace(size=(16, 1024))):
        x = x.astype(np.float32)
        assert relative_rms_error(x, "Q4_K") < relative_rms_error(x, "Q4_1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros_and_constants(fmt: str):
    zeros = np.zeros((2, 256), np.float32)
    assert np.array_equal(dequantize(quantize(zeros, fmt)), zeros)
    for c in (0.25, -7.0):  # one block per row, a constant row is a constant block
        const = np.full((1, 256), c, np.float32)
        back = dequantize(quantize(const, fmt))
        assert np.allclose(back, c, rtol=0.02), (fmt, c, back[0, :4])


def test_from_array_is_quantize():
    x = np.random.default_rng(2).standard_normal((2, 3, 256)).astype(np.float32)
    for fmt in K_QUANTS:
        t = QuantTensor.from_array(x, fmt)
        assert t.shape == x.shape and t.data.shape == (6, bytes_per_row(fmt, 256))
        assert np.array_equal(t.data, quantize(x, fmt).data)


# --- the bundled model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled(bundled_gguf_path) -> GGUFFile:
    return GGUFFile(bundled_gguf_path)


def test_bundled_model_dequantizes_like_gguf(bundled: GGUFFile):
    formats = {t.format for t in bundled.tensors.values()}
    assert {"Q4_1", "Q8_0", "F32"} <= formats
    for name, t in bundled.tensors.items():
        ref = np.asarray(gguf_dequantize(t.data, gguf_type(t.format))).reshape(t.shape)
        assert same_bits(dequantize(t), ref), name


# --- bad input ------------------------------------------------------------------------------


def test_bad_quant_tensors_are_rejected():
    with pytest.raises(ValueError, match="unsupported tensor format 'Q9_9'"):
        QuantTensor("Q9_9", np.zeros((1, 34), np.uint8), (32,))
    with pytest.raises(ValueError, match="row length 31 is not a multiple of the block size 32"):
        QuantTensor("Q8_0", np.zeros((1, 34), np.uint8), (31,))
    with pytest.raises(ValueError, match="needs uint8 data of shape"):
        QuantTensor("Q8_0", np.zeros((1, 34), np.float32), (32,))
    with pytest.raises(ValueError, match=r"needs uint8 data of shape \(2, 34\)"):
        QuantTensor("Q8_0", np.zeros((1, 34), np.uint8), (2, 32))
    with pytest.raises(TypeError, match="numpy uint8 array"):
        QuantTensor("Q8_0", bytes(34), (32,))
    with pytest.raises(ValueError, match="non-empty tuple"):
        QuantTensor("F32", np.zeros((1, 4), np.uint8), ())


def test_bad_quantize_calls_are_rejected():
    with pytest.raises(ValueError, match="unsupported tensor format 'Q5_K'"):
        quantize(np.zeros(256, np.float32), "Q5_K")
    with pytest.raises(ValueError, match="Q4_K: row length 100 is not a multiple"):
        quantize(np.zeros(100, np.float32), "Q4_K")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize(np.float32(1.0), "F32")
    with pytest.raises(TypeError, match="real numbers"):
        quantize(np.array(["a"] * 32), "Q8_0")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(np.r_[np.zeros(31), np.nan].astype(np.float32), "Q8_0")
    with pytest.raises(ValueError, match="row length 300 is not a multiple of the block size 256"):
        bytes_per_row("Q6_K", 300)


@pytest.mark.parametrize(
    ("fmt", "value"), [("F16", 1e5), ("Q4_1", 2e6), ("Q5_0", 2e6), ("Q4_K", 1e9)]
)
def test_values_beyond_fp16_scales_are_rejected(fmt: str, value: float):
    x = np.r_[np.zeros(255), value].astype(np.float32)
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize(x, fmt)
    if fmt in GGUF_QUANTIZES:  # gguf silently stores an infinite scale instead
        with np.errstate(all="ignore"):
            back = gguf_dequantize(gguf_bytes(x[None], fmt), gguf_type(fmt))
        assert not np.isfinite(back).all()
