"""The ``cpu`` backend: every op of the contract (see ref.py) as Numba kernels.

Weights stay in their GGUF block format (``prepare_linear`` only re-arranges the bytes, see
``cpu_packing``) and ``linear`` decodes them in registers (``cpu_linear``); attention reads the
paged KV cache in place (``cpu_attention``). Tensors cross the boundary as zero-copy numpy views
of CPU float32 torch tensors; the caches are written in place.

Beyond the contract, ``decoder_layers`` runs all layers of a decode-only step with one compiled
call per layer (``cpu_layer``): the same kernels in the same order, without ~15 crossings from
Python per layer. The model uses it when a backend has it (``LlamaModel.fused_decode``).

Threads: the kernels use Numba's thread pool, sized by NUMBA_NUM_THREADS (default: all cores);
``numba.set_num_threads`` lowers it at run time. Torch ops between kernels (residual adds,
reshapes, sampling) use torch's own pool: keep ``torch.set_num_threads`` equal to Numba's count.
The two pools never run at the same time (no kernel calls torch), so nothing is nested. Both are
OpenMP pools whose idle workers spin for a while before sleeping: on a machine whose cores are
busy with other programs, those spinning workers take the cores from the threads doing the
work and a 2-thread decode can slow down tenfold. There, run with OMP_WAIT_POLICY=passive (or a
short GOMP_SPINCOUNT such as 3000) set before Python starts, or with one thread.

The GIL: every kernel is compiled with ``nogil=True``, so while a step computes, the server's
event loop (another Python thread) keeps streaming tokens, parsing requests and tokenizing. With
the GIL held, that work waited for the end of each step and then held the next one up: at 16
streams it was ~20% of the time between tokens (bench_serving).

Compilation: kernels compile on first use and are cached on disk (``cache=True``) in the one
directory minillm.numba_cache chooses (NUMBA_CACHE_DIR), which `make setup` warms, so only the
very first run pays it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import numpy as np
import torch

from minillm.formats.blocks import QuantTensor
from minillm.kernels import check_activations
from minillm.kernels import cpu_a8 as _a8
from minillm.kernels import cpu_linear as _lin
from minillm.kernels import cpu_q4 as _q4
from minillm.kernels.cpu_attention import paged_decode, paged_prefill, store_kv_slots
from minillm.kernels.cpu_layer import decode_layer
from minillm.kernels.cpu_packing import PackedWeight, pack_weight
from minillm.kernels.cpu_pointwise import (
    gelu_tanh_mul_rows,
    rms_norm_rows,
    rope_heads,
    silu_mul_rows,
)
from minillm.kv.cache import copy_host_kv_blocks, host_kv_cache

if TYPE_CHECKING:  # the model layer sits above the kernels: a type-only import
    from minillm.model.batch import ForwardBatch

name = "cpu"

# The KV cache: host float32 tensors, read and written in place by the kernels (see ref.py).
allocate_kv_cache = host_kv_cache
copy_kv_blocks = copy_host_kv_blocks


# ----------------------------------------------------------------------------- tensors
def _array(t: torch.Tensor, what: str, dtype: type = np.float32) -> np.ndarray:
    """A C-contiguous numpy view (a copy only when t is strided or of another dtype)."""
    try:
        a = t.numpy()  # the fast path: a CPU tensor that needs no grad
    except AttributeError:
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}") from None
    except (RuntimeError, TypeError):
        if t.device.type != "cpu":
            raise ValueError(
                f"the cpu backend needs CPU tensors; {what} is on {t.device}"
            ) from None
        a = t.detach().numpy()
    if a.dtype != dtype or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=dtype)
    return a


def _cache_array(t: torch.Tensor, what: str) -> np.ndarray:
    """The KV cache itself (never a copy): writes must land in the engine's tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous float32 torch tensor (NB, BS, KvH, D)")
    if t.dim() != 4:
        raise ValueError(f"{what} must be 4-D (NB, BS, KvH, D), got shape {tuple(t.shape)}")
    return t.detach().numpy()


def _packed(w: object, what: str) -> PackedWeight:
    if type(w) is not PackedWeight:
        raise TypeError(
            f"{what} must come from cpu.prepare_linear / prepare_embedding, got {type(w).__name__}"
        )
    return w


# ----------------------------------------------------------------------------- weights
# What matmuls do with their input x: "int8" quantizes it to int8 blocks and multiplies bytes by
# weight bytes in integers (W4A8, as llama.cpp; cpu_a8), "fp32" decodes the weights to float32
# (W4A16-style, exact to fp32 rounding). Chosen when weights are prepared, so a model keeps its
# mode; float (F32/F16/BF16) weights always compute in fp32.
_activations: ContextVar[str] = ContextVar("minillm_cpu_activations", default="int8")


@contextmanager
def activations(mode: str) -> Iterator[None]:
    """Weights prepared inside this block compute with `mode` activations ("int8" | "fp32")."""
    token = _activations.set(check_activations(mode))
    try:
        yield
    finally:
        _activations.reset(token)


def prepare_linear(w: QuantTensor) -> PackedWeight:
    """Repack once at load; memory stays about the GGUF size (see cpu_packing)."""
    return pack_weight(w, int8_activations=_activations.get() == "int8")


def prepare_vector(w: QuantTensor) -> torch.Tensor:
    """Norm weights and biases are small: plain float32."""
    return torch.from_numpy(np.array(w.dequantize(), dtype=np.float32).reshape(-1))


prepare_embedding = prepare_linear


def tied_lm_head(embed: PackedWeight) -> PackedWeight:
    """A tied output projection reads the very same packed blocks as the embedding."""
    return _packed(embed, "embed")


# ----------------------------------------------------------------------------- matmul
def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W (out, in).T [+ bias] -> (..., out), computed on the packed blocks."""
    w = _packed(w, "w")
    xa = _array(x, "x")
    if xa.ndim == 0 or xa.shape[-1] != w.cols:
        raise ValueError(
            f"linear: x has shape {tuple(xa.shape)}, the weight needs {w.cols} "
            "input features in the last dim"
        )
    x2 = xa if xa.ndim == 2 else xa.reshape(-1, w.cols)  # (T, in): the model's case
    out = np.empty((x2.shape[0], w.rows), dtype=np.float32)
    _lin.packed_matmul(x2, *w.kernel_args, out)
    if bias is not None:
        out += _array(bias, "bias")
    return torch.from_numpy(out if xa.ndim == 2 else out.reshape(*xa.shape[:-1], w.rows))


def embedding(ids: torch.Tensor, table: PackedWeight) -> torch.Tensor:
    """ids (T,) -> (T, d): only the looked-up rows are dequantized."""
    table = _packed(table, "table")
    idx = _array(ids, "ids", np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= table.rows):
        raise ValueError(
            f"embedding: token ids must be in [0, {table.rows}), got [{idx.min()}, {idx.max()}]"
        )
    out = np.empty((idx.size, table.cols), dtype=np.float32)
    if table.kind == "q4":
        _q4.q4_rows(idx, table.codes, table.scale, table.offset, table.offset_mult, out)
    elif table.kind == "q8":
        _lin.q8_rows(idx, table.codes, table.scale, table.block, out)
    elif table.kind == "q8_panels":
        _a8.q8_panel_rows(idx, table.codes, table.scale, out)
    else:
        _lin.float_rows(idx, table.codes, table.is_bf16, out)
    return torch.from_numpy(out.reshape(*ids.shape, table.cols))


# ----------------------------------------------------------------------------- elementwise
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, over the last dim."""
    xa = _array(x, "x")
    wa = _array(weight, "weight").reshape(-1)
    if xa.ndim == 0 or xa.shape[-1] != wa.shape[0]:
        raise ValueError(f"rms_norm: x {tuple(xa.shape)} and weight {tuple(wa.shape)} disagree")
    x2 = xa.reshape(-1, wa.shape[0])
    out = np.empty_like(x2)
    rms_norm_rows(x2, wa, float(eps), out)
    return torch.from_numpy(out.reshape(xa.shape))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of each head; x (T, H, D), cos/sin (T, D/2)."""
    xa, ca, sa = _array(x, "x"), _array(cos, "cos"), _array(sin, "sin")
    if (
        xa.ndim != 3
        or xa.shape[2] % 2
        or ca.shape != (xa.shape[0], xa.shape[2] // 2)
        or sa.shape != ca.shape
    ):
        raise ValueError(
            f"rope: need x (T, H, D) with even D and cos/sin (T, D/2); got "
            f"{tuple(xa.shape)}, {tuple(ca.shape)}, {tuple(sa.shape)}"
        )
    out = np.empty_like(xa)
    rope_heads(xa, ca, sa, out)
    return torch.from_numpy(out)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up."""
    ga, ua = _array(gate, "gate"), _array(up, "up")
    if ga.shape != ua.shape or ga.ndim == 0:
        raise ValueError(f"silu_mul: gate {tuple(ga.shape)} and up {tuple(ua.shape)} differ")
    out = np.empty_like(ga)
    silu_mul_rows(
        ga.reshape(-1, ga.shape[-1]), ua.reshape(-1, ga.shape[-1]), out.reshape(-1, ga.shape[-1])
    )
    return torch.from_numpy(out)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU's gate (Gemma): gelu(gate) * up, GELU in its tanh approximation."""
    ga, ua = _array(gate, "gate"), _array(up, "up")
    if ga.shape != ua.shape or ga.ndim == 0:
        raise ValueError(f"gelu_tanh_mul: gate {tuple(ga.shape)} and up {tuple(ua.shape)} differ")
    out = np.empty_like(ga)
    f = ga.shape[-1]
    gelu_tanh_mul_rows(ga.reshape(-1, f), ua.reshape(-1, f), out.reshape(-1, f))
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- KV + attention
def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V (T, KvH, D) into its slot, in place."""
    kc, vc = _cache_array(k_cache, "k_cache"), _cache_array(v_cache, "v_cache")
    ka, va = _array(k, "k"), _array(v, "v")
    slots = _array(slot_mapping, "slot_mapping", np.int64).reshape(-1)
    want = (slots.shape[0], *kc.shape[2:])
    if ka.shape != want or va.shape != want or vc.shape != kc.shape:
        raise ValueError(
            f"store_kv: k/v must be {want} to fit caches {tuple(kc.shape)}; got "
            f"{tuple(ka.shape)}, {tuple(va.shape)}, v_cache {tuple(vc.shape)}"
        )
    store_kv_slots(ka, va, kc, vc, slots)


def _window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"attention: window must be an integer >= 0 (0: none), got {window!r}")
    return window


def _check_q(q: np.ndarray, kc: np.ndarray, vc: np.ndarray) -> None:
    if q.ndim != 3 or vc.shape != kc.shape or q.shape[2] != kc.shape[3] or q.shape[1] % kc.shape[2]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} must be (., H, D) with H a multiple "
            f"of the caches' KvH; caches {tuple(kc.shape)}, {tuple(vc.shape)}"
        )


def attention_decode_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q (B, H, D), one new token per sequence, attends to its context via its block table
    (with `window` > 0: to its last `window` positions only)."""
    qa = _array(q, "q")
    kc, vc = _cache_array(k_cache, "k_cache"), _cache_array(v_cache, "v_cache")
    _check_q(qa, kc, vc)
    tables = _array(block_tables, "block_tables", np.int64)
    lens = _array(context_lens, "context_lens", np.int64).reshape(-1)
    if tables.ndim != 2 or tables.shape[0] != qa.shape[0] or lens.shape[0] != qa.shape[0]:
        raise ValueError(
            f"attention_decode_paged: block_tables {tuple(tables.shape)} and "
            f"context_lens {tuple(lens.shape)} must have B={qa.shape[0]} rows"
        )
    out = np.empty_like(qa)
    if qa.shape[0]:
        paged_decode(qa, kc, vc, tables, lens, float(scale), _window(window), out)
    return torch.from_numpy(out)


def attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention for one sequence's n new tokens, the last n of its context_len (with
    `window` > 0: each sees its last `window` positions only)."""
    qa = _array(q, "q")
    kc, vc = _cache_array(k_cache, "k_cache"), _cache_array(v_cache, "v_cache")
    _check_q(qa, kc, vc)
    table = _array(block_table, "block_table", np.int64).reshape(-1)
    context_len = int(context_len)
    if not 1 <= qa.shape[0] <= context_len:
        raise ValueError(
            f"attention_prefill: {qa.shape[0]} new tokens cannot end a context of {context_len}"
        )
    out = np.empty_like(qa)
    paged_prefill(qa, kc, vc, table, context_len, float(scale), _window(window), out)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- fused decode
_NO_BIAS = np.zeros(0, dtype=np.float32)
_layer_arrays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_LAYER_VECTORS = ("attn_norm", "ffn_norm")
_LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_LAYER_BIASES = ("bq", "bk", "bv")
_LAYER_FIELDS = _LAYER_VECTORS + _LAYER_WEIGHTS + _LAYER_BIASES


def _arrays_of(layer: object) -> tuple:
    """A layer's norms, packed weights and biases as the fused kernel takes them: built once,
    and again only if one of the layer's attributes has been replaced since."""
    sources = tuple(getattr(layer, name) for name in _LAYER_FIELDS)
    cached = _layer_arrays.get(layer)
    if cached is not None and all(a is b for a, b in zip(cached[0], sources, strict=True)):
        return cached[1]

    def vector(t: torch.Tensor | None, what: str) -> np.ndarray:
        return _NO_BIAS if t is None else _array(t, what).reshape(-1)

    arrays = tuple(
        _packed(src, name).layer_args if name in _LAYER_WEIGHTS else vector(src, name)
        for name, src in zip(_LAYER_FIELDS, sources, strict=True)
    )
    _layer_arrays[layer] = (sources, arrays)
    return arrays


def decoder_layers(
    x: torch.Tensor,
    layers: list,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    batch: ForwardBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """All layers of a decode-only batch, one compiled call per layer (see ``cpu_layer``).

    ``layers``: objects with the model's per-layer attributes (attn_norm, ffn_norm, wq, wk, wv,
    wo, w_gate, w_up, w_down from this backend's prepare_*; bq, bk, bv or None). x (B, d) is
    updated in place and returned; the result equals running the ops one by one."""
    if batch.prefills or batch.num_decode != batch.num_tokens:
        raise ValueError("decoder_layers runs decode-only batches; prefill chunks go op by op")
    xa = _array(x, "x")
    if xa.ndim != 2:
        raise ValueError(f"decoder_layers: x must be (B, d), got shape {tuple(xa.shape)}")
    slots = _array(batch.slot_mapping, "slot_mapping", np.int64).reshape(-1)
    tables = _array(batch.decode_block_tables, "block_tables", np.int64)
    lens = _array(batch.decode_context_lens, "context_lens", np.int64).reshape(-1)
    ca, sa = _array(cos, "cos"), _array(sin, "sin")
    b = xa.shape[0]
    if slots.shape[0] != b or lens.shape[0] != b or tables.ndim != 2 or tables.shape[0] != b:
        raise ValueError(
            f"decoder_layers: slot_mapping {tuple(slots.shape)}, block_tables "
            f"{tuple(tables.shape)} and context_lens {tuple(lens.shape)} must have B={b} rows"
        )
    for i, (layer, kc, vc) in enumerate(zip(layers, k_caches, v_caches, strict=True)):
        kca, vca = _cache_array(kc, f"k_caches[{i}]"), _cache_array(vc, f"v_caches[{i}]")
        decode_layer(
            xa, *_arrays_of(layer), kca, vca, slots, tables, lens, ca, sa,
            float(eps), float(scale), int(num_heads),
        )  # fmt: skip
    return torch.from_numpy(xa)  # x itself when it was a contiguous float32 tensor
