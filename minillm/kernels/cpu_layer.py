"""A whole decoder layer of a decode step as one compiled call: the CPU's CUDA graph.

Op by op, a decode step of SmolLM2 crosses from Python into Numba ~450 times (15 ops x 30
layers), and each crossing costs a few microseconds of tensor conversion, argument checks and
dispatch around kernels that may run for one (an RMSNorm of 576 numbers). On 2 cores that was
a third of the step. vLLM meets the same problem on GPUs (kernel launches of a few microseconds
each) by capturing the decode forward once as a CUDA graph and replaying it. Here the same
kernels, in the same order as ``model/llama.py``, are composed inside one Numba function, so
Python is crossed once per layer and the result is bit-for-bit the op-by-op one (tested).

Merging more was tried and measured: q, k and v as one parallel loop, and gate, up and silu as
another, saved ~3 us per loop start in isolation, but made single-stream decode ~8% slower in
the engine (5 alternating runs each), so every matrix keeps its own loop.

Only decode-only batches (one new token per sequence) take this path; a batch with prefill
chunks runs op by op (its attention is per chunk, and its kernels are long enough that the
calls around them do not matter).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from minillm.kernels.cpu_a8 import quantize_for_matmul
from minillm.kernels.cpu_attention import paged_decode, store_kv_slots
from minillm.kernels.cpu_linear import matmul_quantized
from minillm.kernels.cpu_pointwise import rms_norm_rows, rope_heads, silu_mul_rows


@njit(inline="always", cache=True)
def _project(h, hquant, w, bias):  # noqa: ANN001, ANN202
    """h (T, K) @ W.T (+ bias; an empty bias means none) -> (T, N); w is a layer_args tuple,
    hquant h's int8 blocks when W's matmul takes them (``quantize_for_matmul``)."""
    out = np.empty((h.shape[0], w[0]), np.float32)
    matmul_quantized(h, hquant, w[1], w[2], w[3], w[4], w[5], w[6], w[7], out)
    if bias.shape[0]:
        out += bias
    return out


@njit(inline="always", cache=True)
def _project_alone(h, w, bias):  # noqa: ANN001, ANN202
    """``_project`` for a matrix that has h to itself (o, down): quantized here if W needs it."""
    return _project(h, quantize_for_matmul(h, w[7]), w, bias)


@njit(nogil=True, cache=True)
def decode_layer(  # noqa: ANN201, PLR0913 - one argument per tensor the layer reads
    x,  # noqa: ANN001 - (B, d) float32, updated in place: x + attention, then + FFN
    attn_norm,  # noqa: ANN001
    ffn_norm,  # noqa: ANN001
    wq,  # noqa: ANN001 - layer_args tuples of the packed weights
    wk,  # noqa: ANN001
    wv,  # noqa: ANN001
    wo,  # noqa: ANN001
    w_gate,  # noqa: ANN001
    w_up,  # noqa: ANN001
    w_down,  # noqa: ANN001
    bq,  # noqa: ANN001 - biases (Qwen2), empty arrays when the model has none
    bk,  # noqa: ANN001
    bv,  # noqa: ANN001
    k_cache,  # noqa: ANN001 - (NB, BS, KvH, D), written in place
    v_cache,  # noqa: ANN001
    slots,  # noqa: ANN001 - (B,) int64: where each token's K/V goes
    block_tables,  # noqa: ANN001 - (B, max_blocks) int64
    context_lens,  # noqa: ANN001 - (B,) int64
    cos,  # noqa: ANN001 - (B, D/2)
    sin,  # noqa: ANN001
    eps,  # noqa: ANN001
    scale,  # noqa: ANN001
    num_heads,  # noqa: ANN001
):
    b, d = x.shape
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    no_bias = bq[:0]  # an empty float32 array: only q/k/v may carry biases
    # ---- attention block: x + Wo . attn(rope(Wq.h), rope(Wk.h), Wv.h), h = norm(x)
    h = np.empty_like(x)
    rms_norm_rows(x, attn_norm, eps, h)
    hquant = quantize_for_matmul(h, wq[7] or wk[7] or wv[7])  # once for all three
    q = _project(h, hquant, wq, bq).reshape(b, num_heads, head_dim)
    k = _project(h, hquant, wk, bk).reshape(b, kv_heads, head_dim)
    v = _project(h, hquant, wv, bv).reshape(b, kv_heads, head_dim)
    q_rot, k_rot = np.empty_like(q), np.empty_like(k)
    rope_heads(q, cos, sin, q_rot)
    rope_heads(k, cos, sin, k_rot)
    store_kv_slots(k_rot, v, k_cache, v_cache, slots)
    attn = np.empty_like(q_rot)
    paged_decode(q_rot, k_cache, v_cache, block_tables, context_lens, scale, 0, attn)
    x += _project_alone(attn.reshape(b, num_heads * head_dim), wo, no_bias)
    # ---- feed-forward block (SwiGLU): x + W_down . (silu(W_gate.h) * W_up.h)
    rms_norm_rows(x, ffn_norm, eps, h)
    hquant = quantize_for_matmul(h, w_gate[7] or w_up[7])
    gate, up = _project(h, hquant, w_gate, no_bias), _project(h, hquant, w_up, no_bias)
    act = np.empty_like(gate)
    silu_mul_rows(gate, up, act)
    x += _project_alone(act, w_down, no_bias)
