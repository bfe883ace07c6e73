"""Scalar helpers the Numba kernels share: 16-bit floats widened to float32, in-kernel.

Numba has no float16 type on the CPU, so an fp16 or bf16 value arrives as its uint16 bit
pattern. Where the CPU has F16C (every x86 CPU since 2013) the bits are handed to LLVM as a
``half`` and widened with one ``vcvtph2ps`` instruction, as llama.cpp does; elsewhere they are
rebuilt with integer operations plus one bit cast. Both are exact and branch-free, so loops
over F16 weights vectorize.

Integer traps: Numba types ``int32 & int32`` (and any integer arithmetic) as int64, so
``np.float32(byte & 0x0F)`` becomes a widen-to-64-bit plus an int64 -> float conversion, twice
the vector instructions of the 32-bit form. The nibble helpers below are LLVM intrinsics that
stay in 32 bits; in the q4 matvec that alone made the kernel 1.6x faster.

Numba's on-disk cache checks only the source file of each cached kernel, not the files of the
helpers inlined into it: after editing this file, delete ``minillm/kernels/__pycache__/*.nb*``.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Only the flags that let LLVM vectorize float reductions (reassociation) and fuse a*b+c into
# one FMA (contraction); no "no-NaN/no-Inf" promises, because softmax masks with -inf.
FASTMATH = {"reassoc", "contract"}


@intrinsic
def bits_to_f32(typingctx, bits):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


HAS_F16C = bool(llvm.get_host_cpu_features().get("f16c", False))


@intrinsic
def _f16c_to_f32(typingctx, bits):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """fp16 bits -> float32 through LLVM's own half type (one vcvtph2ps with F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def nibble_lo(typingctx, byte):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """float32(byte & 0x0F), computed in 32-bit integers (see the module docstring)."""
    return types.float32(types.uint8), _nibble_codegen(0x0F)


@intrinsic
def nibble_hi(typingctx, byte):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """float32(byte >> 4), in 32-bit integers."""
    return types.float32(types.uint8), _nibble_codegen(0xF0, shift=4)


def _nibble_codegen(mask: int, shift: int = 0):  # noqa: ANN202
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i32 = ir.IntType(32)
        masked = builder.and_(builder.zext(args[0], i32), ir.Constant(i32, mask))
        if shift:
            masked = builder.lshr(masked, ir.Constant(i32, shift))
        return builder.sitofp(masked, ir.FloatType())

    return codegen


@intrinsic
def int8_to_float(typingctx, code):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """float32(int8) through a 32-bit sign extension, never a 64-bit one."""
    if code != types.int8:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.sitofp(builder.sext(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(code), codegen


@intrinsic
def prefetch(typingctx, array, index):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """Ask the CPU to start loading the cache line of array[index] (1-D) now; no result, no
    fault if it is never used. LLVM's ``llvm.prefetch`` (read, keep in all cache levels)."""
    if not (
        isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)
    ):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, array_type, ary, [args[1]], wraparound=False, boundscheck=False
        )
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        read, keep_everywhere, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
        builder.call(fn, [builder.bitcast(ptr, i8p), read, keep_everywhere, data])
        return context.get_dummy_value()

    return types.none(array, index), codegen


# Single-token matvecs prefetch the weight bytes this far ahead of the rows they compute: the
# hardware prefetcher alone left the lm_head at half the machine's read bandwidth.
PREFETCH_AHEAD = 4096


@njit(inline="always", cache=True)
def prefetch_range(flat, start, length):  # noqa: ANN001, ANN201
    """Prefetch flat[start:start + length] (bytes of a uint8/int8 array), one line at a time."""
    for i in range(start, min(start + length, flat.shape[0]), 64):
        prefetch(flat, i)


@njit(inline="always", cache=True)
def half_to_float(h: np.uint16) -> np.float32:
    """IEEE fp16 bits -> float32, exact: the F16C instruction where there is one."""
    if HAS_F16C:  # a compile-time constant: the other branch is never compiled in
        return _f16c_to_f32(h)
    return half_to_float_portable(h)


@njit(inline="always", cache=True)
def half_to_float_portable(h: np.uint16) -> np.float32:
    """IEEE fp16 bits -> float32 without F16C: exact for normals, subnormals and infinities; NaN stays NaN.

    Exponent and mantissa move to float32's position and the value is scaled by 2^112, which
    re-biases the exponent (15 -> 127); a subnormal fp16 becomes a subnormal float32 that the
    scaling makes normal. Inf/NaN (exponent 31) get float32's all-ones exponent and a scale of
    1 instead. Integer arithmetic only, no branch, so that loops over F16 weights vectorize.
    """
    h32 = np.uint32(h)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    magnitude = h32 & np.uint32(0x7FFF)
    special = np.uint32(magnitude >= np.uint32(0x7C00))  # 1 for Inf/NaN, else 0
    bits = sign | (magnitude << np.uint32(13)) | (special * np.uint32(0x7F800000))
    # bits of 2^112 (0x77800000) normally, of 1.0 (0x3F800000) for Inf/NaN
    factor = np.uint32(0x77800000) - special * np.uint32(0x77800000 - 0x3F800000)
    return bits_to_f32(bits) * bits_to_f32(factor)


@njit(inline="always", cache=True)
def bf16_to_float(h: np.uint16) -> np.float32:
    """bfloat16 bits are the top half of a float32."""
    return bits_to_f32(np.uint32(h) << np.uint32(16))


def as_float(v):  # noqa: ANN001, ANN201 - dispatched by the overload below
    """A block scale as float32, whether stored as float32 or as fp16 bits (uint16)."""
    raise NotImplementedError("only callable from Numba code")


@overload(as_float, inline="always")
def _as_float_impl(v):  # noqa: ANN001, ANN202
    if v == types.uint16:
        return lambda v: half_to_float(v)
    if isinstance(v, types.Float):
        return lambda v: np.float32(v)
    return None


def widen(v, is_bf16):  # noqa: ANN001, ANN201 - dispatched by the overload below
    """A weight as float32: float32 as is, uint16 as bf16 bits (is_bf16) or fp16 bits."""
    raise NotImplementedError("only callable from Numba code")


@overload(widen, inline="always")
def _widen_impl(v, is_bf16):  # noqa: ANN001, ANN202
    if v == types.uint16:
        return lambda v, is_bf16: bf16_to_float(v) if is_bf16 else half_to_float(v)
    if isinstance(v, types.Float):
        return lambda v, is_bf16: np.float32(v)
    return None


@intrinsic
def _stack_alloc(typingctx, size, dtype):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """A pointer to `size` elements on the stack (an LLVM alloca in the function's entry).

    Only valid inside the function that calls it: use it through an ``inline="always"``
    helper (inlined into the caller's Numba IR), never from a function that returns it.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        count = ir.Constant(ir.IntType(64), size.literal_value)  # a constant: entry-block alloca
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=count)

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@njit(inline="always", cache=True)
def lanes(n):  # noqa: ANN001, ANN201 - n must be a literal
    """n float32 accumulators on the stack, zeroed.

    A heap array (np.zeros) would live in memory: LLVM cannot prove that it does not alias the
    weights, so every update would load and store it. A fixed-size stack array accessed at
    constant offsets is promoted to SIMD registers (32 floats: 2 AVX-512 registers, or 4 AVX2).
    """
    acc = carray(_stack_alloc(n, np.float32), n)
    for j in range(n):
        acc[j] = 0
    return acc


@njit(inline="always", fastmath=FASTMATH, cache=True)
def lanes_sum(acc):  # noqa: ANN001, ANN201
    """Sum of 32 lanes as a tree (16 + 8 + 4 + ... adds, vectorized), not a 32-long chain."""
    for j in range(16):
        acc[j] += acc[j + 16]
    for j in range(8):
        acc[j] += acc[j + 8]
    for j in range(4):
        acc[j] += acc[j + 4]
    return (acc[0] + acc[2]) + (acc[1] + acc[3])


# e^x as float32 arithmetic: np.exp is a call into the C math library, one value at a time, so a
# loop that calls it cannot be vectorized (SwiGLU's silu took ~1.3 ms of a 16-sequence decode
# step). Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r from a degree-6 polynomial
# (relative error ~1e-7), 2^n written straight into the float's exponent bits.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln2 = hi + lo
_EXP_POLY = tuple(
    np.float32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
              1.6666665459e-1, 5.0000001201e-1)
)  # fmt: skip


@njit(inline="always", fastmath=FASTMATH, cache=True)
def exp_f32(x: np.float32) -> np.float32:
    """e^x for float32 x, vectorizable. Below -88: 0 (e^-inf = 0); above 88.37: inf (2^128
    overflows a little before e^x does, at 88.72); NaN stays NaN."""
    c = min(max(x, np.float32(-88.0)), np.float32(88.7))
    n = np.floor(c * _LOG2E + np.float32(0.5))
    r = (c - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_POLY[0]
    for coef in _EXP_POLY[1:]:
        p = p * r + coef
    e = (p * (r * r) + r) + np.float32(1)
    scale = bits_to_f32(np.int32(n + np.float32(127)) << np.int32(23))  # 2^n (0 when n = -127)
    return x if x != x else e * scale
