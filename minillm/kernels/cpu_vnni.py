"""int8 activations as LLVM vector code: their quantization and their dot products with 4- and
8-bit weights.

The int8-activation kernels (``cpu_a8``) spend their time in one operation: multiply 64 unsigned
bytes by 64 signed bytes and add each group of four products into one of 16 int32 lanes. With
AVX-512 VNNI that is one instruction, ``vpdpbusd``; llama.cpp's Q8 x Q4 dot products are built on
it (and on AVX2's ``vpmaddubsw`` + ``vpmaddwd`` pair where VNNI is missing). Numba cannot write
a vector type, so the helpers here are intrinsics that emit the LLVM IR themselves: loads of
64 bytes, the byte shuffle, nibble masks, broadcasts, and the dot product.

- ``q4_block_fma``: one block (32 weights) of one 16-row panel (``cpu_packing``) against up to
  ``tokens`` tokens. The panel stores byte j of the block's 16 rows side by side; ``vpermb``
  turns 64 of those bytes (bytes j..j+3 of 16 rows) into 16 lanes of four consecutive weights
  of one row each, the low nibbles being weights j..j+3 and the high ones j+16..j+19.
- ``q8_block_fma``: one block of a 16-row int8 panel against ``tokens`` tokens. VNNI
  multiplies *unsigned* by signed bytes, so the weights get 128 added (one xor of the sign bit)
  and 128 x (the activations' sums) is taken off again: exact.
- ``quantize_block``: 32 activations to int8 codes and their scale (the Q8_0 rule).
- ``dpbusd_chain``: ``vpdpbusd`` on registers only, for the int8 roof (``roofline``).

Where the CPU lacks VNNI: 4-bit codes go through AVX2's ``vpmaddubsw`` (byte pairs into int16,
which 4-bit codes cannot saturate) and ``vpmaddwd`` (int16 pairs into int32), as llama.cpp does;
8-bit codes (up to 255 once unsigned would saturate int16) and CPUs without AVX2 get the same
sums as plain LLVM integer arithmetic (widen, multiply, add in fours), which every target
compiles. All paths give identical results; ``HAS_VNNI`` / ``HAS_AVX2`` say which this machine
compiled.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic


def _target_has(feature: str) -> bool:
    """Whether the code Numba compiles may use `feature` (Numba targets the host CPU unless
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise)."""
    if config.CPU_FEATURES:
        return f"+{feature}" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME and config.CPU_NAME != "host":
        return False  # a named portable target (e.g. generic): assume the least
    return bool(llvm.get_host_cpu_features().get(feature, False))


# MINILLM_NO_VNNI=1 compiles the portable path on a VNNI machine (tests compare the two; use a
# separate NUMBA_CACHE_DIR, since the cache does not know about this switch).
HAS_VNNI = (
    _target_has("avx512vnni") and _target_has("avx512bw") and not os.environ.get("MINILLM_NO_VNNI")
)
HAS_AVX2 = _target_has("avx2")

_I8, _I32 = ir.IntType(8), ir.IntType(32)
_BYTES, _LANES = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)
_FLOATS = ir.VectorType(ir.FloatType(), 16)
# vpermb: lane r of the result gets bytes 16k + r (k = 0..3) of a panel's 64 bytes (j = k, row r)
_PANEL_TO_LANES = ir.Constant(
    ir.VectorType(_I32, 64), [16 * k + r for r in range(16) for k in range(4)]
)


def _splat(builder: ir.IRBuilder, value: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    first = builder.insert_element(
        ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0)
    )
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined), zeros)


def _dpbusd(
    builder: ir.IRBuilder, acc: ir.Value, unsigned: ir.Value, signed: ir.Value, small: bool = False
) -> ir.Value:
    """acc[l] + sum over k < 4 of unsigned[4l + k] * signed[4l + k] (16 int32 lanes).

    small: the unsigned bytes are below 16 (4-bit codes), so AVX2's ``vpmaddubsw``, which
    adds pairs of products into int16 with saturation, cannot saturate (2 x 15 x 128 < 2^15)."""
    if HAS_VNNI:
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(_LANES, [_LANES, _BYTES, _BYTES]),
            "llvm.x86.avx512.vpdpbusd.512",
        )
        return builder.call(fn, [acc, unsigned, signed])
    if HAS_AVX2 and small:  # llama.cpp's pre-VNNI pair: vpmaddubsw, then vpmaddwd by ones
        half, shorts = ir.VectorType(_I8, 32), ir.VectorType(ir.IntType(16), 16)
        maddubs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(shorts, [half, half]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VectorType(_I32, 8), [shorts, shorts]),
            "llvm.x86.avx2.pmadd.wd",
        )
        ones = ir.Constant(shorts, [1] * 16)
        parts = []
        for lo in (0, 32):
            pick = ir.Constant(ir.VectorType(_I32, 32), list(range(lo, lo + 32)))
            u = builder.shuffle_vector(unsigned, ir.Constant(_BYTES, ir.Undefined), pick)
            v = builder.shuffle_vector(signed, ir.Constant(_BYTES, ir.Undefined), pick)
            parts.append(builder.call(maddwd, [builder.call(maddubs, [u, v]), ones]))
        both = builder.shuffle_vector(parts[0], parts[1], ir.Constant(_LANES, list(range(16))))
        return builder.add(acc, both)
    wide = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
    for k in range(4):
        part = builder.shuffle_vector(
            products, ir.Constant(wide, ir.Undefined), ir.Constant(_LANES, list(range(k, 64, 4)))
        )
        acc = builder.add(acc, part)
    return acc


def _pointer(context, builder, array_type, array, index, index_type) -> ir.Value:  # noqa: ANN001
    """i8* to array[index] of a 1-D array (no bounds check: the kernels compute the offsets)."""
    ary = context.make_array(array_type)(context, builder, array)
    index = context.cast(builder, index, index_type, types.intp)
    ptr = cgutils.get_item_pointer(
        context, builder, array_type, ary, [index], wraparound=False, boundscheck=False
    )
    return builder.bitcast(ptr, _I8.as_pointer())


def _at(builder: ir.IRBuilder, ptr: ir.Value, offset: ir.Value | int) -> ir.Value:
    if isinstance(offset, int):
        offset = ir.Constant(ir.IntType(64), offset)
    return builder.gep(ptr, [offset])


def _load(builder: ir.IRBuilder, ptr: ir.Value, vector_type: ir.Type) -> ir.Value:
    return builder.load(builder.bitcast(ptr, vector_type.as_pointer()), align=1)


def _is_1d(array: types.Type, dtype: types.Type) -> bool:
    return isinstance(array, types.Array) and array.ndim == 1 and array.dtype == dtype


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a * b + c in 16 float lanes, one rounding (``vfmadd``)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_FLOATS, [_FLOATS] * 3), "llvm.fma.v16f32"
    )
    return builder.call(fn, [a, b, c])


def _float_lanes(builder: ir.IRBuilder, ptr: ir.Value, lane: int) -> ir.Value:
    """Pointer to 16 floats from float index `lane` of a float32 array's data (i8*)."""
    floats = builder.bitcast(ptr, ir.FloatType().as_pointer())
    return builder.bitcast(_at(builder, floats, lane), _FLOATS.as_pointer())


def _scalar(context, builder, array_type, array, index, index_type) -> ir.Value:  # noqa: ANN001
    """array[index] of a 1-D float32 array, as an LLVM float."""
    ptr = _pointer(context, builder, array_type, array, index, index_type)
    return builder.load(builder.bitcast(ptr, ir.FloatType().as_pointer()))


def _is_scale_array(array: types.Type) -> bool:
    """Block scales: fp16 bit patterns (uint16) or float32, flat."""
    return (
        isinstance(array, types.Array)
        and array.ndim == 1
        and array.dtype
        in (
            types.uint16,
            types.float32,
        )
    )


def _scale_lanes(context, builder, array_type, array, at, at_type) -> ir.Value:  # noqa: ANN001, PLR0913
    """16 consecutive block scales from array[at] as 16 float lanes: fp16 bits are widened by
    one ``vcvtph2ps`` (in Numba code, one at a time, they cost more than the dot product)."""
    ptr = _pointer(context, builder, array_type, array, at, at_type)
    if array_type.dtype == types.float32:
        return builder.load(builder.bitcast(ptr, _FLOATS.as_pointer()), align=2)
    halves = builder.load(builder.bitcast(ptr, ir.VectorType(ir.HalfType(), 16).as_pointer()),
                          align=2)  # fmt: skip
    return builder.fpext(halves, _FLOATS)


@intrinsic
def q4_block_fma(
    typingctx,
    acc,
    codes,
    w_at,
    xq,
    x_at,
    x_stride,
    scale,
    offset,
    sc_at,
    mult,
    xd,
    xs,
    s_at,
    s_stride,
    tokens,
):  # noqa: ANN001, ANN201, PLR0913
    """One block (32 weights) of a 16-row panel against `tokens` tokens, accumulated:

        acc[16 i + r] += (d[r] xd_i) * sum_j q[r, j] a_i[j]  +  mult m[r] xs_i

    the sum exact in int32 (``vpdpbusd``). codes: the q4 codes (uint8, flat), w_at: the block's
    first byte (256 bytes, [j][row]); xq: int8 activations (flat), token i's block from
    x_at + i x_stride; scale, offset: the panel's block scales d and offsets m (flat, fp16 bits
    or float32), the block's 16 at sc_at; mult: the offset's multiplier (float32); xd, xs: the
    activations' block scales and d x sums (float32, flat), token i's at s_at + i s_stride;
    acc: 16 x tokens float32 (a stack array: LLVM keeps it in registers); tokens: a literal.

    The float update is here too, not in Numba code: there LLVM vectorized it across the
    tokens, with gathers and scatters, and the kernel ran at a tenth of its speed."""
    ok = (
        _is_1d(acc, types.float32)
        and _is_1d(codes, types.uint8)
        and _is_1d(xq, types.int8)
        and _is_scale_array(scale)
        and _is_scale_array(offset)
        and isinstance(mult, types.Float)
        and all(_is_1d(v, types.float32) for v in (xd, xs))
        and isinstance(tokens, types.IntegerLiteral)
    )
    if not ok:
        return None
    n_tokens = tokens.literal_value
    sig = types.none(acc, codes, w_at, xq, x_at, x_stride, scale, offset, sc_at, mult, xd, xs,
                     s_at, s_stride, tokens)  # fmt: skip

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        acc_v, codes_v, w_at_v, xq_v, x_at_v, xstr_v, sc_v, off_v, sc_at_v, mult_v = args[:10]
        xd_v, xs_v, s_at_v, sstr_v = args[10:14]
        a = signature.args
        w = _pointer(context, builder, codes, codes_v, w_at_v, a[2])
        x0 = _pointer(context, builder, xq, xq_v, x_at_v, a[4])
        x_stride = context.cast(builder, xstr_v, a[5], types.intp)
        zero_at = ir.Constant(_I32, 0)
        acc_p = _pointer(context, builder, acc, acc_v, zero_at, types.int32)
        d_vec = _scale_lanes(context, builder, scale, sc_v, sc_at_v, a[8])
        mult_f = context.cast(builder, mult_v, a[9], types.float32)
        m_vec = builder.fmul(_scale_lanes(context, builder, offset, off_v, sc_at_v, a[8]),
                             _splat(builder, mult_f, _FLOATS))  # fmt: skip
        s_at = context.cast(builder, s_at_v, a[12], types.intp)
        s_stride = context.cast(builder, sstr_v, a[13], types.intp)
        low_mask, four = ir.Constant(_BYTES, [0x0F] * 64), ir.Constant(_BYTES, [4] * 64)
        lo, hi = [], []
        for g in range(4):  # bytes 4g..4g+3 of 16 rows: weights 4g.. (low) and 16+4g.. (high)
            raw = _load(builder, _at(builder, w, 64 * g), _BYTES)
            lanes = builder.shuffle_vector(raw, ir.Constant(_BYTES, ir.Undefined), _PANEL_TO_LANES)
            lo.append(builder.and_(lanes, low_mask))
            hi.append(builder.lshr(lanes, four))
        zero = ir.Constant(_LANES, [0] * 16)
        for i in range(n_tokens):
            step = ir.Constant(ir.IntType(64), i)
            xi = _at(builder, x0, builder.mul(x_stride, step))
            acc_lo, acc_hi = zero, zero  # two chains: half the dependent-latency path
            for g in range(4):
                a_lo = _splat(builder, _load(builder, _at(builder, xi, 4 * g), _I32), _LANES)
                a_hi = _splat(builder, _load(builder, _at(builder, xi, 16 + 4 * g), _I32), _LANES)
                acc_lo = _dpbusd(builder, acc_lo, lo[g], builder.bitcast(a_lo, _BYTES), small=True)
                acc_hi = _dpbusd(builder, acc_hi, hi[g], builder.bitcast(a_hi, _BYTES), small=True)
            total = builder.sitofp(builder.add(acc_lo, acc_hi), _FLOATS)
            at = builder.add(s_at, builder.mul(s_stride, step))
            dx = _splat(builder, _scalar(context, builder, xd, xd_v, at, types.intp), _FLOATS)
            sx = _splat(builder, _scalar(context, builder, xs, xs_v, at, types.intp), _FLOATS)
            slot = _float_lanes(builder, acc_p, 16 * i)
            value = _fma(builder, total, builder.fmul(d_vec, dx), builder.load(slot, align=4))
            builder.store(_fma(builder, m_vec, sx, value), slot, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q8_block_fma(
    typingctx,
    acc,
    codes,
    w_at,
    xq,
    x_at,
    x_stride,
    scale,
    lo_at,
    hi_at,
    xd,
    s_at,
    s_stride,
    sum16,
    tokens,
):  # noqa: ANN001, ANN201, PLR0913
    """One block (32 int8 weights) of a 16-row q8 panel against `tokens` tokens, accumulated:

        acc[16 i + r] += xd_i (d_lo[r] sum_{j<16} w[r, j] a_i[j] + d_hi[r] sum_{j>=16} ...)

    the sums exact in int32. codes: the panel's int8 codes (flat), w_at: the block's first
    byte (512 bytes: [j // 4][row][j % 4], already in ``vpdpbusd``'s lane order); the weights
    get 128 added (one xor of the sign bit: ``vpdpbusd`` multiplies unsigned by signed bytes)
    and 128 x the activations' sums of 16 (sum16, int32, flat; token i's two at
    s_at + i s_stride) are taken off again. scale: the panel's scales (flat, fp16 bits or
    float32), the 16 rows' for the block's two halves at lo_at and hi_at (the same place
    unless the format has 16-blocks, as Q6_K); xq, x_at, x_stride: as ``q4_block_fma``; xd
    (flat): token i's block scale at (s_at + i s_stride) / 2; acc: 16 x tokens float32."""
    ok = (
        _is_1d(acc, types.float32)
        and _is_1d(codes, types.int8)
        and _is_1d(xq, types.int8)
        and _is_scale_array(scale)
        and _is_1d(xd, types.float32)
        and _is_1d(sum16, types.int32)
        and isinstance(tokens, types.IntegerLiteral)
    )
    if not ok:
        return None
    n_tokens = tokens.literal_value
    sig = types.none(acc, codes, w_at, xq, x_at, x_stride, scale, lo_at, hi_at, xd, s_at,
                     s_stride, sum16, tokens)  # fmt: skip

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        acc_v, codes_v, w_at_v, xq_v, x_at_v, xstr_v, sc_v, lo_at_v, hi_at_v = args[:9]
        xd_v, s_at_v, sstr_v, s16_v = args[9:13]
        a, i64 = signature.args, ir.IntType(64)
        w = _pointer(context, builder, codes, codes_v, w_at_v, a[2])
        x0 = _pointer(context, builder, xq, xq_v, x_at_v, a[4])
        x_stride = context.cast(builder, xstr_v, a[5], types.intp)
        s_at = context.cast(builder, s_at_v, a[10], types.intp)  # in halves (16-weight units)
        s_stride = context.cast(builder, sstr_v, a[11], types.intp)
        acc_p = _pointer(context, builder, acc, acc_v, ir.Constant(_I32, 0), types.int32)
        d_lo_vec = _scale_lanes(context, builder, scale, sc_v, lo_at_v, a[7])
        d_hi_vec = _scale_lanes(context, builder, scale, sc_v, hi_at_v, a[8])
        sign = ir.Constant(_BYTES, [0x80] * 64)
        unsigned = [builder.xor(_load(builder, _at(builder, w, 64 * g), _BYTES), sign)
                    for g in range(8)]  # fmt: skip
        zero, two = ir.Constant(_LANES, [0] * 16), ir.Constant(i64, 2)
        for i in range(n_tokens):
            step = ir.Constant(i64, i)
            xi = _at(builder, x0, builder.mul(x_stride, step))
            halves = []
            for h in range(2):  # weights 0..15 and 16..31: one scale each
                acc_h = zero
                for g in range(4 * h, 4 * h + 4):
                    word = _splat(builder, _load(builder, _at(builder, xi, 4 * g), _I32), _LANES)
                    acc_h = _dpbusd(builder, acc_h, unsigned[g], builder.bitcast(word, _BYTES))
                at = builder.add(
                    builder.add(s_at, builder.mul(s_stride, step)), ir.Constant(i64, h)
                )
                sum_h = _pointer(context, builder, sum16, s16_v, at, types.intp)
                offset = builder.load(builder.bitcast(sum_h, _I32.as_pointer()))
                acc_h = builder.sub(acc_h, _splat(builder, builder.shl(offset, ir.Constant(_I32, 7)),
                                                  _LANES))  # fmt: skip
                halves.append(builder.sitofp(acc_h, _FLOATS))
            block_at = builder.sdiv(builder.add(s_at, builder.mul(s_stride, step)), two)
            dx = _splat(builder, _scalar(context, builder, xd, xd_v, block_at, types.intp), _FLOATS)
            slot = _float_lanes(builder, acc_p, 16 * i)
            value = _fma(
                builder, halves[0], builder.fmul(d_lo_vec, dx), builder.load(slot, align=4)
            )
            builder.store(
                _fma(builder, halves[1], builder.fmul(d_hi_vec, dx), value), slot, align=4
            )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def quantize_block(typingctx, x, x_at, xq, q_at, xd, xs, s_at, sum16):  # noqa: ANN001, ANN201
    """One block of 32 activations to int8, the Q8_0 rule in vector code: d = max|x| / 127,
    q = round-half-even(x * (1/d)) (d = 0: q = 0); xd[s_at] = d, xs[s_at] = d * sum(q),
    sum16[2 s_at], sum16[2 s_at + 1] = the sums of the two halves' q. x (float32), xq (int8),
    xd, xs (float32), sum16 (int32): flat arrays; the block from x[x_at] to xq[q_at].

    In Numba code the same loop stayed scalar (a rounding call and a conversion per value): at
    ~1.5 ns a value it cost as much as the matmuls it fed at 16 tokens. Here it is two loads,
    a max, a multiply, ``vrndscaleps``, two narrowings and two sums per 32 values."""
    ok = (
        _is_1d(x, types.float32)
        and _is_1d(xq, types.int8)
        and all(_is_1d(v, types.float32) for v in (xd, xs))
        and _is_1d(sum16, types.int32)
    )
    if not ok:
        return None
    sig = types.none(x, x_at, xq, q_at, xd, xs, s_at, sum16)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        x_v, x_at_v, xq_v, q_at_v, xd_v, xs_v, s_at_v, s16_v = args
        a, f32 = signature.args, ir.FloatType()
        src = builder.bitcast(_pointer(context, builder, x, x_v, x_at_v, a[1]), f32.as_pointer())
        dst = _pointer(context, builder, xq, xq_v, q_at_v, a[3])
        halves = [_load(builder, builder.bitcast(_at(builder, src, 16 * h), _I8.as_pointer()),
                        _FLOATS) for h in range(2)]  # fmt: skip
        # max|x| on the bit patterns: with the sign bit cleared, a float's order is its
        # unsigned integer order, and an integer max reduces in a few shuffles (a float one,
        # NaN-aware, became a chain of 15 scalar compares)
        magnitude = ir.Constant(_LANES, [0x7FFFFFFF] * 16)
        bits = [builder.and_(builder.bitcast(v, _LANES), magnitude) for v in halves]
        umax = _vector_fn(builder, "llvm.umax.v16i32", _LANES, 2)
        reduce_max = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_LANES]), "llvm.vector.reduce.umax.v16i32"
        )
        amax = builder.bitcast(builder.call(reduce_max, [builder.call(umax, bits)]), f32)
        d = builder.fdiv(amax, ir.Constant(f32, 127.0))
        positive = builder.fcmp_ordered(">", d, ir.Constant(f32, 0.0))
        inv = builder.select(
            positive, builder.fdiv(ir.Constant(f32, 1.0), d), ir.Constant(f32, 0.0)
        )
        rint = _vector_fn(builder, "llvm.rint.v16f32", _FLOATS, 1)
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_LANES]), "llvm.vector.reduce.add.v16i32"
        )
        s_at = context.cast(builder, s_at_v, a[6], types.intp)
        total = ir.Constant(_I32, 0)
        for h in range(2):
            q = builder.fptosi(
                builder.call(rint, [builder.fmul(halves[h], _splat(builder, inv, _FLOATS))]), _LANES
            )
            narrow = ir.VectorType(_I8, 16)
            builder.store(builder.trunc(q, narrow),
                          builder.bitcast(_at(builder, dst, 16 * h), narrow.as_pointer()), align=1)  # fmt: skip
            half_sum = builder.call(reduce_add, [q])
            at = builder.add(
                builder.mul(s_at, ir.Constant(s_at.type, 2)), ir.Constant(s_at.type, h)
            )
            ptr = _pointer(context, builder, sum16, s16_v, at, types.intp)
            builder.store(half_sum, builder.bitcast(ptr, _I32.as_pointer()))
            total = builder.add(total, half_sum)
        for array, array_v, value in (
            (xd, xd_v, d),
            (xs, xs_v, builder.fmul(d, builder.sitofp(total, f32))),
        ):
            ptr = _pointer(context, builder, array, array_v, s_at, types.intp)
            builder.store(value, builder.bitcast(ptr, f32.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


def _vector_fn(builder: ir.IRBuilder, name: str, vector_type: ir.Type, arity: int) -> ir.Function:
    """An LLVM vector intrinsic taking and returning `vector_type` (llvm.umax, llvm.rint...)."""
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector_type, [vector_type] * arity), name
    )


CHAINS = 6  # independent accumulators in dpbusd_chain: enough to hide the instruction's latency


@intrinsic
def dpbusd_chain(typingctx, steps):  # noqa: ANN001, ANN201 - Numba intrinsic signature
    """`steps` rounds of CHAINS independent ``vpdpbusd`` (64 byte multiply-adds each) on
    registers only, for the int8 roof (``roofline.measure_int8_peak``); returns the sum of every
    lane, so LLVM cannot drop the loop."""
    if not isinstance(steps, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        ones = ir.Constant(_BYTES, [1] * 64)
        zero = ir.Constant(_LANES, [0] * 16)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(CHAINS)]
        count = context.cast(builder, args[0], signature.args[0], types.intp)
        with cgutils.for_range(builder, count):
            for slot in accs:
                builder.store(_dpbusd(builder, builder.load(slot), ones, ones), slot)
        total = builder.load(accs[0])
        for slot in accs[1:]:
            total = builder.add(total, builder.load(slot))
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_LANES]), "llvm.vector.reduce.add.v16i32"
        )
        return builder.sext(builder.call(reduce, [total]), ir.IntType(64))

    return types.int64(steps), codegen
