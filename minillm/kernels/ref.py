"""The reference backend: every op of the backend contract in plain torch fp32.

This file is the specification. The Numba (cpu) and numba.cuda (cuda) backends are tested
against it op by op, so it favours the obvious formula over speed.

Shapes: T tokens in a flattened batch, H query heads, KvH key/value heads, D head dim,
NB cache blocks of BS slots. KV caches are (NB, BS, KvH, D).
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.formats.blocks import QuantTensor
from minillm.kv.cache import copy_host_kv_blocks, host_kv_cache

name = "ref"

# The KV cache lives where the ops read it: zeroed host tensors here. The engine allocates it
# through these two (allocate_kv_cache(shape); copy_kv_blocks(caches, src, dst), copy-on-write).
allocate_kv_cache = host_kv_cache
copy_kv_blocks = copy_host_kv_blocks


# ----------------------------------------------------------------------------- weights
def prepare_linear(w: QuantTensor) -> torch.Tensor:
    """ref computes in fp32, so a weight is dequantized once at load time: (out, in)."""
    return torch.from_numpy(np.array(w.dequantize(), dtype=np.float32))


def prepare_vector(w: QuantTensor) -> torch.Tensor:
    return torch.from_numpy(np.array(w.dequantize(), dtype=np.float32).reshape(-1))


prepare_embedding = prepare_linear


# ----------------------------------------------------------------------------- ops
def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids (T,) -> rows of table (V, d) -> (T, d)"""
    return table[ids]


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) @ W (out, in).T -> (T, out)"""
    y = x @ w.T
    return y if bias is None else y + bias


ACTIVATION_BLOCK = 32  # activations per int8 scale, as llama.cpp's Q8_0 blocks


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (q int8 (T, K), d float32 (T, K/32)), x ~ q * d per block of 32.

    d = max|x| / 127 and q = round-half-even(x * (1/d)), in float32 (a block of zeros: d = 0,
    q = 0). This is the rule of llama.cpp's Q8_0 activation blocks and of the cpu backend's
    int8 activations (kernels/cpu_a8.py), which are tested to produce the same q and d."""
    if x.dim() != 2 or x.shape[1] % ACTIVATION_BLOCK:
        raise ValueError(f"x must be (T, K) with K a multiple of 32, got {tuple(x.shape)}")
    blocks = x.float().reshape(x.shape[0], -1, ACTIVATION_BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None])  # torch.round: half to even, as rint
    return q.to(torch.int8).reshape(x.shape), d


def linear_int8_activations(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ W (out, in).T with x first quantized to int8 blocks (quantize_activations):
    what the cpu backend's W4A8 matmul computes, here in float64 on the exact codes."""
    q, d = quantize_activations(x)
    x_hat = q.double().reshape(*d.shape, ACTIVATION_BLOCK) * d.double()[..., None]
    return (x_hat.reshape(x.shape) @ w.double().T).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of each head by the token's angle (the 'rotate half' layout).

    x (T, H, D); cos, sin (T, D/2).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU's gate (Gemma): gelu(gate) * up, GELU in its tanh approximation."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V (T, KvH, D) into its slot: slot = block_id * BS + offset."""
    nb, bs, kvh, d = k_cache.shape
    k_cache.view(nb * bs, kvh, d)[slot_mapping] = k
    v_cache.view(nb * bs, kvh, d)[slot_mapping] = v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention. q (B, Q, H, D), k/v (B, L, KvH, D), mask (B, Q, L) True=keep."""
    b, nq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, nq, kvh, h // kvh, d)  # each KV head serves h // kvh query heads
    scores = torch.einsum("bqkgd,blkd->bkgql", qg, k) * scale
    scores = scores.masked_fill(~mask[:, None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgql,blkd->bqkgd", probs, v)
    return out.reshape(b, nq, h, d)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` slots of one sequence, read through its block table -> (length, KvH, D)."""
    return cache[block_table].flatten(0, 1)[:length]


def attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention for one sequence's n new tokens, which sit at the END of its context.

    q (n, H, D). Keys are the sequence's first context_len cached slots (a cached prefix and
    earlier chunks included); token i (position context_len - n + i) sees keys 0..its position,
    or with a sliding `window` > 0 only the last `window` of them (itself included).
    """
    n = q.shape[0]
    k = gather_kv(k_cache, block_table, context_len)
    v = gather_kv(v_cache, block_table, context_len)
    q_pos = torch.arange(context_len - n, context_len)[:, None]
    key_pos = torch.arange(context_len)[None, :]
    mask = key_pos <= q_pos
    if window:
        mask &= key_pos > q_pos - window
    return _attend(q[None], k[None], v[None], mask[None], scale)[0]


def attention_decode_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """One new token per sequence attends to its whole context through its block table, or
    with a sliding `window` > 0 to its last `window` positions (itself included).

    q (B, H, D); block_tables (B, M) padded with any valid block id; context_lens (B,).
    """
    b, m = block_tables.shape
    bs = k_cache.shape[1]
    k = k_cache[block_tables].flatten(1, 2)  # (B, M*BS, KvH, D): ref gathers, kernels read in place
    v = v_cache[block_tables].flatten(1, 2)
    key_pos = torch.arange(m * bs)[None, :]
    mask = key_pos < context_lens[:, None]
    if window:
        mask &= key_pos >= context_lens[:, None] - window
    return _attend(q[:, None], k, v, mask[:, None, :], scale)[:, 0]
