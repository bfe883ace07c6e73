"""The cuda backend: the ops of ref.py as numba.cuda kernels.

It runs on an NVIDIA GPU, or without one under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``
set before numba is imported), where every CUDA thread becomes a Python thread: slow, so only
tiny shapes, but the very same kernel source.

Where the data lives:

- **weights** are copied to the device once, at load time (``prepare_*``), and stay there as
  the bytes of their GGUF format (Q8_0 / Q4_0 / Q4_1) or as fp32. Other formats (F16, BF16,
  K-quants) are dequantized to fp32 first: correct, but 2-7x more bytes to stream per token.
- **activations**: the ops below take CPU torch tensors, copy them to the device for one op
  and back (two PCIe copies per op): the form the lessons call one op at a time. The engine
  does not use them: ``resident_forward`` runs the whole model on the device, activations in
  a reused workspace, six fused launches per layer, only the step's token ids and bookkeeping
  in and the sampled rows' logits out (``cuda_resident.py``, ``cuda_fused.py``).
- **the KV cache** lives on the device: the engine asks the backend for it
  (``allocate_kv_cache``), so ops read and write device arrays (NB, BS, KvH, D) in place with
  global block ids and nothing crosses PCIe for attention. Host tensors still work (lessons and
  tests pass them): an op then copies over only the blocks it touches and ``store_kv`` writes
  them back, which costs 2 * layers * context * KvH * D * 4 bytes per sequence per step. Both
  paths are tested.

Launch shapes (the GPU's, or the simulator's few threads) are a ``LaunchConfig`` from
``cuda_launch.py``; the kernels are correct under either (grid-stride loops), and the tests
run both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda

from minillm.formats.blocks import QuantTensor

# the launch shapes live in cuda_launch; tests, lessons and benchmarks reach them as cu.*
from minillm.kernels.cuda_launch import (  # noqa: F401 - GPU_LAUNCH & co. are re-exported
    GPU_LAUNCH,
    SIM_LAUNCH,
    SIMULATED,
    LaunchConfig,
    launch_config,
    simulator_switching,
    use_launch_config,
)

if not SIMULATED and not cuda.is_available():
    raise ImportError(
        "backend 'cuda' needs an NVIDIA GPU that numba.cuda can use, or numba's simulator: set "
        "NUMBA_ENABLE_CUDASIM=1 before numba is first imported (tiny shapes only, it is slow)"
    )

from minillm.kernels.cuda_attention import (  # noqa: E402
    make_paged_decode_attention,
    make_paged_prefill_attention,
)
from minillm.kernels.cuda_linear import make_matvec, make_tiled_matmul  # noqa: E402
from minillm.kernels.cuda_pointwise import (  # noqa: E402
    make_embedding,
    make_rms_norm,
    make_rope,
    make_silu_mul,
    make_store_kv,
)
from minillm.kernels.cuda_quant import KERNEL_FORMATS  # noqa: E402

name = "cuda"


def _grid(work_items: int) -> int:
    return max(1, min(work_items, launch_config().max_blocks))


# ----------------------------------------------------------------------------- data movement
def _is_device_array(a: object) -> bool:
    """numba device arrays (real or simulated) have copy_to_host; torch and numpy do not."""
    return hasattr(a, "copy_to_host") and not isinstance(a, torch.Tensor | np.ndarray)


def _to_device(a: object, dtype: type = np.float32):  # noqa: ANN202 - a device array
    if _is_device_array(a):
        return a
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))


def _to_torch(d) -> torch.Tensor:  # noqa: ANN001 - a device array
    return torch.from_numpy(d.copy_to_host())


def _empty(*shape: int):  # noqa: ANN202 - a device array
    return cuda.device_array(shape, dtype=np.float32)


@functools.cache
def _no_bias():  # noqa: ANN202 - a device array
    """A one-element placeholder: kernels take a bias array even when use_bias is 0."""
    return cuda.to_device(np.zeros(1, dtype=np.float32))


# ----------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class DeviceWeight:
    """A weight matrix resident on the device: GGUF block bytes (rows, row_bytes) for quantized
    formats, float32 (rows, cols) for F32."""

    format: str
    shape: tuple[int, int]  # logical (out, in)
    data: object  # numba device array

    @property
    def nbytes(self) -> int:
        return int(self.data.size * self.data.dtype.itemsize)


def prepare_linear(w: QuantTensor) -> DeviceWeight:
    """Copy a weight to the device once, quantized bytes and all."""
    if not isinstance(w, QuantTensor):
        raise TypeError(f"prepare_linear needs a QuantTensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"a linear weight must be 2-D (out, in), got shape {w.shape}")
    rows, cols = w.shape
    if w.format in KERNEL_FORMATS and w.format != "F32":
        host = np.ascontiguousarray(w.data)
        fmt = w.format
    else:  # F32 as floats; F16/BF16/K-quants widened to F32 (no kernel reads them directly)
        host = np.ascontiguousarray(w.dequantize(), dtype=np.float32).reshape(rows, cols)
        fmt = "F32"
    return DeviceWeight(fmt, (rows, cols), cuda.to_device(host))


prepare_embedding = prepare_linear  # the embedding table is read row by row by its own kernel


def prepare_vector(w: QuantTensor):  # noqa: ANN201 - a device array
    """Norm weights and biases: small fp32 vectors, on the device."""
    return cuda.to_device(np.ascontiguousarray(w.dequantize(), dtype=np.float32).reshape(-1))


def _as_weight(w: object) -> DeviceWeight:
    """ops also take plain fp32 matrices (torch / numpy), as ref's prepared weights are."""
    if isinstance(w, DeviceWeight):
        return w
    if isinstance(w, torch.Tensor | np.ndarray) and len(w.shape) == 2:
        return DeviceWeight("F32", (int(w.shape[0]), int(w.shape[1])), _to_device(w))
    raise TypeError(
        f"expected a DeviceWeight (from prepare_linear) or a 2-D fp32 matrix, "
        f"got {type(w).__name__}"
    )


# ----------------------------------------------------------------------------- ops
def embedding(ids: torch.Tensor, table: DeviceWeight) -> torch.Tensor:
    """ids (T,) -> rows of table (V, d) -> (T, d)"""
    table = _as_weight(table)
    ids = torch.as_tensor(ids)
    if ids.dim() != 1:
        raise ValueError(f"embedding ids must be 1-D (T,), got shape {tuple(ids.shape)}")
    vocab, dim = table.shape
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
        )
    out = _empty(len(ids), dim)
    if len(ids):
        threads = launch_config().elementwise_threads
        with simulator_switching():
            make_embedding(table.format)[_grid(-(-len(ids) * dim // threads)), threads](
                _to_device(ids, np.int64), table.data, out
            )
    return _to_torch(out)


def linear(x: torch.Tensor, w: DeviceWeight, bias: object | None = None) -> torch.Tensor:
    """x (T, in) @ W (out, in).T -> (T, out): tiled matmul for T > 1 on fp32 weights, else the
    row-per-warp matvec (decode, and every quantized weight)."""
    w = _as_weight(w)
    n_out, n_in = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight expects {n_in}")
    lead = tuple(x.shape[:-1])
    x2 = _to_device(x.reshape(-1, n_in))
    n_tok = x2.shape[0]
    use_bias = bias is not None
    b = _to_device(bias) if use_bias else _no_bias()
    if use_bias and b.shape[0] != n_out:
        raise ValueError(f"linear: bias has {b.shape[0]} entries, the weight has {n_out} rows")
    out = _empty(n_tok, n_out)
    if n_tok:
        cfg = launch_config()
        with simulator_switching():
            if w.format == "F32" and n_tok > 1:
                tiles = -(-n_tok // cfg.tile_rows) * -(-n_out // cfg.tile_cols)
                kernel = make_tiled_matmul(cfg.tile_cols, cfg.tile_rows, cfg.tile_depth)
                kernel[_grid(tiles), cfg.tile_cols](x2, w.data, b, int(use_bias), out)
            else:
                groups = -(-n_out // cfg.rows_per_block)
                grid = (_grid(groups), max(1, min(n_tok, cfg.max_blocks)))
                make_matvec(w.format, cfg.lanes, cfg.rows_per_block)[
                    grid, (cfg.lanes, cfg.rows_per_block)
                ](w.data, x2, b, int(use_bias), out)
    return _to_torch(out).reshape(*lead, n_out)


def rms_norm(x: torch.Tensor, weight: object, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, over the last dim."""
    dim = x.shape[-1]
    w = _to_device(weight)
    if w.shape[0] != dim:
        raise ValueError(f"rms_norm: weight has {w.shape[0]} entries, x has {dim} features")
    x2 = _to_device(x.reshape(-1, dim))
    out = _empty(x2.shape[0], dim)
    if x2.shape[0]:
        threads = launch_config().norm_threads
        with simulator_switching():
            make_rms_norm(threads)[_grid(x2.shape[0]), threads](x2, w, np.float32(eps), out)
    return _to_torch(out).reshape(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of each head. x (T, H, D); cos, sin (T, D/2)."""
    n_tok, n_head, dim = x.shape
    if dim % 2 or tuple(cos.shape) != (n_tok, dim // 2) or tuple(sin.shape) != (n_tok, dim // 2):
        raise ValueError(
            f"rope: x {tuple(x.shape)} needs an even D and cos/sin of shape "
            f"{(n_tok, dim // 2)}, got {tuple(cos.shape)} / {tuple(sin.shape)}"
        )
    out = _empty(n_tok, n_head, dim)
    total = n_tok * n_head * dim // 2
    if total:
        threads = launch_config().elementwise_threads
        with simulator_switching():
            make_rope()[_grid(-(-total // threads)), threads](
                _to_device(x), _to_device(cos), _to_device(sin), out
            )
    return _to_torch(out)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    out = _empty(gate.numel())
    if gate.numel():
        threads = launch_config().elementwise_threads
        with simulator_switching():
            make_silu_mul()[_grid(-(-gate.numel() // threads)), threads](
                _to_device(gate.reshape(-1)), _to_device(up.reshape(-1)), out
            )
    return _to_torch(out).reshape(gate.shape)


# ----------------------------------------------------------------------------- resident
def resident_forward(model: object):  # noqa: ANN201 - a cuda_resident.ResidentForward
    """The model's whole forward on the device: weights, activations and KV cache resident,
    six fused launches per layer (kernels/cuda_resident.py). The engine's path; the ops
    above stay for the lessons, which call them one at a time."""
    from minillm.kernels.cuda_resident import ResidentForward

    return ResidentForward(model)


def resident_accepts(k_caches: list) -> bool:
    """The resident forward reads and writes the cache in place: device arrays only."""
    return bool(k_caches) and _is_device_array(k_caches[0])


# ----------------------------------------------------------------------------- paged KV
def allocate_kv_cache(shape: tuple[int, ...]):  # noqa: ANN201 - a device array
    """A zeroed float32 cache array in device memory (the engine's KV cache on this backend)."""
    return cuda.to_device(np.zeros(shape, dtype=np.float32))


def copy_kv_blocks(caches: list, src: list[int], dst: list[int]) -> None:
    """Block src[i] -> block dst[i] in every cache array, device to device (copy-on-write)."""
    for cache in caches:
        if not _is_device_array(cache):  # host tensors: plain indexing
            cache[torch.tensor(dst)] = cache[torch.tensor(src)]
            continue
        for s, d in zip(src, dst, strict=True):
            cache[d].copy_to_device(cache[s])


def _slot_blocks(slots: torch.Tensor, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct blocks that hold `slots`, and each slot's row in those blocks stacked."""
    idx = slots.numpy()
    blocks = np.unique(idx // block_size)
    return blocks, np.searchsorted(blocks, idx // block_size) * block_size + idx % block_size


def read_kv_slots(caches: list, slots: torch.Tensor) -> torch.Tensor:
    """Token slots of every cache array as a host tensor (len(caches), n, KvH, D): the prompt
    K/V a prefill server sends (one device-to-host copy per block touched)."""
    if not caches or not _is_device_array(caches[0]):
        return torch.stack([t.view(-1, *t.shape[2:])[slots] for t in caches])
    blocks, rows = _slot_blocks(slots, caches[0].shape[1])
    out = []
    for cache in caches:
        held = np.stack([cache[int(b)].copy_to_host() for b in blocks])
        out.append(torch.from_numpy(held.reshape(-1, *held.shape[2:])[rows]))
    return torch.stack(out)


def write_kv_slots(caches: list, slots: torch.Tensor, data: torch.Tensor) -> None:
    """Write data[i] (n, KvH, D) into token slots of caches[i]: K/V received by a decode
    server. A block only partly written keeps its other slots (read, patched, written back)."""
    if not caches or not _is_device_array(caches[0]):
        for t, d in zip(caches, data, strict=True):
            t.view(-1, *t.shape[2:])[slots] = d
        return
    blocks, rows = _slot_blocks(slots, caches[0].shape[1])
    for cache, d in zip(caches, data, strict=True):
        held = np.stack([cache[int(b)].copy_to_host() for b in blocks])
        flat = held.reshape(-1, *held.shape[2:])
        flat[rows] = d.numpy()
        for i, b in enumerate(blocks):
            cache[int(b)].copy_to_device(np.ascontiguousarray(held[i]))


class _PagedBlocks:
    """The cache blocks one op touches, on the device.

    CPU caches: copy over just those blocks (ids sorted, unique) and translate block ids and
    slots to local ones; `write_back` returns them in place. Device caches: used as they are.
    """

    def __init__(self, k_cache: object, v_cache: object, block_ids: torch.Tensor) -> None:
        if _is_device_array(k_cache) != _is_device_array(v_cache):
            raise TypeError("k_cache and v_cache must both be CPU tensors or both device arrays")
        if tuple(k_cache.shape) != tuple(v_cache.shape) or len(k_cache.shape) != 4:
            raise ValueError(
                f"k/v caches must share one (NB, BS, KvH, D) shape, got "
                f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
            )
        self.num_blocks, self.block_size = int(k_cache.shape[0]), int(k_cache.shape[1])
        ids = torch.as_tensor(block_ids).reshape(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(
                f"block ids must be in [0, {self.num_blocks}), "
                f"got {int(ids.min())}..{int(ids.max())}"
            )
        self.on_device = _is_device_array(k_cache)
        if self.on_device:
            self.k, self.v = k_cache, v_cache
            return
        self.ids = torch.unique(ids)
        self.local = torch.full((self.num_blocks,), -1, dtype=torch.long)
        self.local[self.ids] = torch.arange(len(self.ids))
        self.k = _to_device(k_cache[self.ids])
        self.v = _to_device(v_cache[self.ids])

    def table(self, block_table: torch.Tensor):  # noqa: ANN201 - a device array
        t = torch.as_tensor(block_table)
        return _to_device(t if self.on_device else self.local[t], np.int64)

    def slots(self, slot_mapping: torch.Tensor):  # noqa: ANN201 - a device array
        s = torch.as_tensor(slot_mapping)
        if not self.on_device:
            bs = self.block_size
            s = torch.where(s >= 0, self.local[s.clamp(min=0) // bs] * bs + s % bs, -1)
        return _to_device(s, np.int64)

    def write_back(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        if not self.on_device:
            k_cache[self.ids] = _to_torch(self.k)
            v_cache[self.ids] = _to_torch(self.v)


def _check_heads(q_heads: int, q_dim: int, k_cache: object) -> None:
    n_kv, dim = int(k_cache.shape[2]), int(k_cache.shape[3])
    if q_dim != dim or q_heads % n_kv:
        raise ValueError(
            f"attention: q has {q_heads} heads of {q_dim}; the cache has {n_kv} "
            f"KV heads of {dim} (need the same head dim and H % KvH == 0)"
        )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: object, v_cache: object, slot_mapping: torch.Tensor
) -> None:
    """Write each token's K/V (T, KvH, D) into its slot: slot = block_id * BS + offset."""
    slot_mapping = torch.as_tensor(slot_mapping)
    if k.shape != v.shape or k.shape[0] != len(slot_mapping):
        raise ValueError(
            f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)} and "
            f"{len(slot_mapping)} slots do not match"
        )
    if not len(slot_mapping):
        return
    bs = int(k_cache.shape[1])
    blocks = _PagedBlocks(k_cache, v_cache, slot_mapping[slot_mapping >= 0] // bs)
    total = k.numel()
    threads = launch_config().elementwise_threads
    with simulator_switching():
        make_store_kv()[_grid(-(-total // threads)), threads](
            _to_device(k), _to_device(v), blocks.k, blocks.v, blocks.slots(slot_mapping)
        )
    blocks.write_back(k_cache, v_cache)


def attention_prefill(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention for one sequence's n new tokens, which sit at the END of its context.

    q (n, H, D); keys are the sequence's first context_len cached slots.
    """
    n_new, n_head, dim = q.shape
    _check_heads(n_head, dim, k_cache)
    block_table = torch.as_tensor(block_table)
    if not n_new <= context_len <= len(block_table) * int(k_cache.shape[1]):
        raise ValueError(
            f"attention_prefill: context_len {context_len} must cover the {n_new} "
            f"new tokens and fit the {len(block_table)} blocks of the table"
        )
    used = block_table[: -(-context_len // int(k_cache.shape[1]))]
    blocks = _PagedBlocks(k_cache, v_cache, used)
    out = _empty(n_new, n_head, dim)
    threads = launch_config().attn_threads
    with simulator_switching():
        make_paged_prefill_attention(threads, dim)[_grid(-(-n_new // threads) * n_head), threads](
            _to_device(q),
            blocks.k,
            blocks.v,
            blocks.table(used),
            int(context_len),
            np.float32(scale),
            out,
        )
    return _to_torch(out)


def attention_decode_paged(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence attends to its whole context through its block table.

    q (B, H, D); block_tables (B, M) padded with any valid block id; context_lens (B,).
    """
    n_seq, n_head, dim = q.shape
    _check_heads(n_head, dim, k_cache)
    block_tables = torch.as_tensor(block_tables)
    context_lens = torch.as_tensor(context_lens)
    if block_tables.dim() != 2 or len(block_tables) != n_seq or len(context_lens) != n_seq:
        raise ValueError(
            f"attention_decode_paged: q has {n_seq} sequences; block_tables "
            f"{tuple(block_tables.shape)} and context_lens {len(context_lens)}"
        )
    if n_seq and int(context_lens.max()) > block_tables.shape[1] * int(k_cache.shape[1]):
        raise ValueError("attention_decode_paged: a context is longer than its block table")
    blocks = _PagedBlocks(k_cache, v_cache, block_tables)
    out = _empty(n_seq, n_head, dim)
    if n_seq:
        threads = launch_config().attn_threads
        with simulator_switching():
            make_paged_decode_attention(threads, dim)[_grid(n_seq * n_head), threads](
                _to_device(q),
                blocks.k,
                blocks.v,
                blocks.table(block_tables),
                _to_device(context_lens, np.int64),
                np.float32(scale),
                out,
            )
    return _to_torch(out)
