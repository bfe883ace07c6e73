"""The whole Llama forward pass resident on the GPU: what the engine runs on the cuda backend.

Op by op (``cuda.linear`` and friends, which the lessons call one at a time), every op takes
host tensors, copies them over PCIe, launches one kernel and copies the result back: 14 such
round trips per layer per step, which held decode on an H100 to 2.2 tok/s. Here nothing but
the step's bookkeeping crosses the bus:

- **in**: one int64 array per step, uploaded in one copy: token ids, positions, KV slots,
  decode block tables and context lengths, prefill block tables, and the rows to sample.
- **on the device, all step long**: the weights (uploaded once, as GGUF blocks), the paged KV
  cache (the engine's, allocated by the backend), and the activations, in a workspace of
  buffers that grows to the largest batch seen and is then reused (no allocation per step).
- **out**: the logits of the rows the sampler needs, (S, V) float32.

A step is 2 + (5 + attention) * layers + 1 launches (``cuda_fused``; attention is one launch
for all decode rows plus one per prefill chunk): 183 for a SmolLM2 decode step where op by op
made 423, each with its copies (lesson 05 counts both). Decode batches of any size (256
sequences and more) are one launch per part: every kernel loops over tokens on its second
grid axis.

CUDA graphs (capture the step's launches once, replay them with one call, as vLLM does for
decode) are not used yet. numba-cuda 0.30 can launch into a ``cuda.core`` GraphBuilder (it
accepts one where a stream goes), so capture is possible. What it needs: a replayed graph
fixes every argument's address and shape, so each captured batch size needs its own inputs
padded to a fixed shape (the decode block tables widen as contexts grow; vLLM pads to a
ladder of captured sizes), with the step's inputs copied into those buffers before each replay.
It has not been written because it can only be checked on a GPU. With Python-side launch costs
of ~5-20 us, 183 launches bound single-stream decode at roughly 270-1000 steps/s, so that is
where the next speed-up would come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import cuda

from minillm.kernels.cuda_attention import (
    make_paged_decode_attention,
    make_paged_prefill_attention,
)
from minillm.kernels.cuda_fused import (
    make_glu,
    make_norm_matvec,
    make_qkv,
    make_rope_store,
    make_rope_table,
)
from minillm.kernels.cuda_launch import launch_config, simulator_switching
from minillm.kernels.cuda_linear import make_matvec
from minillm.kernels.cuda_pointwise import make_embedding


def matvec_launch(cfg: Any, rows: int, tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, block) of a ``cuda_fused`` matvec: row groups on x, tokens on y, capped."""
    groups = -(-rows // cfg.rows_per_block)
    grid = (max(1, min(groups, cfg.max_blocks)), max(1, min(tokens, cfg.max_blocks)))
    return grid, (cfg.lanes, cfg.rows_per_block)


def flat_launch(cfg: Any, items: int) -> tuple[int, int]:
    """(grid, threads) of an elementwise kernel over `items` work items."""
    threads = cfg.elementwise_threads
    return max(1, min(-(-items // threads), cfg.max_blocks)), threads


class Workspace:
    """Device buffers by name, grown (to a power of two) and then reused: a step allocates
    nothing once the largest batch has been seen. ``take`` returns a view of the shape asked."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> Any:
        size = max(1, int(np.prod(shape)))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = cuda.device_array(1 << (size - 1).bit_length(), dtype=dtype)
            self._buffers[name] = buf
        return buf[: int(np.prod(shape))].reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(int(b.size * b.dtype.itemsize) for b in self._buffers.values())


@dataclass(frozen=True)
class _Layer:
    """One layer's device arrays, as the fused kernels take them."""

    attn_norm: Any
    ffn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    biases: tuple[Any, Any, Any] | None  # q, k, v (Qwen2), or None


def check_step(batch: Any, vocab: int, num_blocks: int, block_size: int, rows: int) -> None:
    """Reject what a kernel would read out of bounds (silently, on a GPU): token ids outside
    the vocabulary, slots and block ids outside the cache, sampled rows outside the batch."""

    def bounds(what: str, values: torch.Tensor, limit: int, low: int = 0) -> None:
        if len(values) and (int(values.min()) < low or int(values.max()) >= limit):
            raise ValueError(
                f"resident forward: {what} must be in [{low}, {limit}), "
                f"got {int(values.min())}..{int(values.max())}"
            )

    bounds("token ids", batch.token_ids, vocab)
    bounds("slots", batch.slot_mapping, num_blocks * block_size, low=-1)
    bounds("sampled rows", batch.logits_rows, rows)
    if batch.num_decode:
        bounds("decode block ids", batch.decode_block_tables.reshape(-1), num_blocks)
        longest = int(batch.decode_context_lens.max())
        if longest > batch.decode_block_tables.shape[1] * block_size:
            raise ValueError("resident forward: a decode context is longer than its block table")
    for p in batch.prefills:
        used = p.block_table[: -(-p.context_len // block_size)]
        bounds("prefill block ids", used, num_blocks)
        if len(used) * block_size < p.context_len or p.length > p.context_len:
            raise ValueError(
                f"resident forward: a prefill chunk of {p.length} tokens with context "
                f"{p.context_len} does not fit its {len(p.block_table)} blocks"
            )


class _StepInputs:
    """The step's int64 bookkeeping, packed on the host, uploaded in one copy, sliced on the
    device into views (token ids, positions, slots, tables, lengths, sampled rows)."""

    def __init__(self, batch: Any, block_size: int, workspace: Workspace) -> None:
        parts: list[tuple[str, np.ndarray]] = [
            ("token_ids", batch.token_ids.numpy()),
            ("positions", batch.positions.numpy()),
            ("slots", batch.slot_mapping.numpy()),
            ("logits_rows", batch.logits_rows.numpy()),
        ]
        if batch.num_decode:
            parts += [
                ("decode_tables", batch.decode_block_tables.numpy()),
                ("decode_lens", batch.decode_context_lens.numpy()),
            ]
        for i, p in enumerate(batch.prefills):
            used = -(-p.context_len // block_size)
            parts.append((f"prefill_table{i}", p.block_table.numpy()[:used]))
        parts = [(name, a) for name, a in parts if a.size]  # an empty part needs no view
        flat = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for _, a in parts]
        host = np.concatenate(flat)
        device = workspace.take("step_inputs", (len(host),), np.int64)
        device.copy_to_device(host)
        views, start = {}, 0
        for (name, a), f in zip(parts, flat, strict=True):
            views[name] = device[start : start + len(f)].reshape(a.shape)
            start += len(f)
        self.token_ids, self.positions = views["token_ids"], views["positions"]
        self.slots, self.logits_rows = views["slots"], views.get("logits_rows")
        self.decode_tables = views.get("decode_tables")
        self.decode_lens = views.get("decode_lens")
        self.prefill_tables = [views[f"prefill_table{i}"] for i in range(len(batch.prefills))]


class ResidentForward:
    """Runs a LlamaModel's forward on the device (see the module docstring).

    Built from a model whose weights the cuda backend prepared (``DeviceWeight`` matrices,
    device vectors); reads its config, layers, embed, final_norm, lm_head and inv_freq.
    """

    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.config = cfg
        self.scale = float(model.scale)
        self.embed, self.final_norm, self.lm_head = model.embed, model.final_norm, model.lm_head
        self.inv_freq = cuda.to_device(np.ascontiguousarray(model.inv_freq.numpy(), np.float64))
        self.layers = []
        for layer in model.layers:
            mats = [layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down]
            if not all(hasattr(m, "format") and hasattr(m.data, "copy_to_host") for m in mats):
                raise TypeError("ResidentForward needs weights prepared by the cuda backend")
            biases = (layer.bq, layer.bk, layer.bv)
            if all(b is None for b in biases):
                kept = None
            else:  # a missing bias among present ones: zeros of its length
                kept = tuple(
                    b if b is not None else cuda.to_device(np.zeros(m.shape[0], np.float32))
                    for b, m in zip(biases, mats[:3], strict=True)
                )
            self.layers.append(_Layer(layer.attn_norm, layer.ffn_norm, *mats, kept))
        self._no_bias = cuda.to_device(np.zeros(1, np.float32))  # kernels take a bias array
        self.workspace = Workspace()
        self.launches = 0  # kernel launches so far (the lesson counts them per step)
        self._prepared: dict[Any, list] = {}  # launch shapes -> each layer's kernels

    # ------------------------------------------------------------------ launch helpers
    def _kernels(self, lc: Any) -> list[tuple[Any, Any, Any, Any]]:
        """Each layer's (qkv, o, glu, down) kernels for these launch shapes, looked up once
        (a layer's weight formats pick its compiled variants)."""
        if lc not in self._prepared:
            d, lanes, slots = self.config.hidden_size, lc.lanes, lc.rows_per_block
            self._prepared[lc] = [
                (
                    make_qkv(layer.wq.format, layer.wk.format, layer.wv.format, lanes, slots, d),
                    make_matvec(layer.wo.format, lanes, slots, accumulate=True),
                    make_glu(layer.w_gate.format, layer.w_up.format, lanes, slots, d),
                    make_matvec(layer.w_down.format, lanes, slots, accumulate=True),
                )
                for layer in self.layers
            ]
        return self._prepared[lc]

    def _matvec_grid(self, rows: int, tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return matvec_launch(self.launch, rows, tokens)

    def _flat_grid(self, items: int) -> tuple[int, int]:
        return flat_launch(self.launch, items)

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: Any, k_caches: list, v_caches: list) -> torch.Tensor:
        """One step: the batch's tokens through every layer (K/V written into the caches);
        returns the logits (S, V) of batch.logits_rows, on the host."""
        self.launch = launch_config()  # the shapes in force (tests switch them)
        with simulator_switching():
            return self._step(batch, k_caches, v_caches)

    def _step(self, batch: Any, k_caches: list, v_caches: list) -> torch.Tensor:
        cfg, lc, ws = self.config, self.launch, self.workspace
        n_tok, d = batch.num_tokens, cfg.hidden_size
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n_q, n_kv = heads * head_dim, kv_heads * head_dim
        block_size = int(k_caches[0].shape[1])
        check_step(batch, self.embed.shape[0], int(k_caches[0].shape[0]), block_size, n_tok)
        inputs = _StepInputs(batch, block_size, ws)
        n_rows = int(batch.logits_rows.shape[0])
        launches = 0

        x = ws.take("x", (n_tok, d))
        grid, threads = self._flat_grid(n_tok * d)
        make_embedding(self.embed.format)[grid, threads](inputs.token_ids, self.embed.data, x)
        cos = ws.take("cos", (n_tok, head_dim // 2))
        sin = ws.take("sin", (n_tok, head_dim // 2))
        grid, threads = self._flat_grid(n_tok * head_dim // 2)
        make_rope_table()[grid, threads](inputs.positions, self.inv_freq, cos, sin)
        launches += 2

        qkv = ws.take("qkv", (n_tok, n_q + 2 * n_kv))
        q = ws.take("q", (n_tok, heads, head_dim))
        attn = ws.take("attn", (n_tok, heads, head_dim))
        act = ws.take("act", (n_tok, cfg.intermediate_size))
        attn_flat = attn.reshape(n_tok, n_q)
        eps = np.float32(cfg.rms_norm_eps)
        scale = np.float32(self.scale)
        # launch shapes: the same for every layer of this step
        qkv_grid = self._matvec_grid(n_q + 2 * n_kv, n_tok)
        rope_grid = self._flat_grid(n_tok * (heads + 2 * kv_heads) * head_dim // 2)
        d_grid = self._matvec_grid(d, n_tok)
        glu_grid = self._matvec_grid(cfg.intermediate_size, n_tok)
        rope_store = make_rope_store()
        for layer, kernels, kc, vc in zip(
            self.layers, self._kernels(lc), k_caches, v_caches, strict=True
        ):
            qkv_kernel, o_kernel, glu_kernel, down_kernel = kernels
            bq, bk, bv = layer.biases or (self._no_bias,) * 3
            qkv_kernel[qkv_grid](
                x, layer.attn_norm, eps, layer.wq.data, layer.wk.data, layer.wv.data,
                bq, bk, bv, int(layer.biases is not None), qkv,
            )  # fmt: skip
            rope_store[rope_grid](qkv, cos, sin, inputs.slots, kc, vc, q)
            launches += 2 + self._attention(q, kc, vc, attn, batch, inputs, scale)
            o_kernel[d_grid](layer.wo.data, attn_flat, self._no_bias, 0, x)
            glu_kernel[glu_grid](x, layer.ffn_norm, eps, layer.w_gate.data, layer.w_up.data, act)
            down_kernel[d_grid](layer.w_down.data, act, self._no_bias, 0, x)
            launches += 3

        vocab = self.lm_head.shape[0]
        if not n_rows:  # a step that samples nothing (a prefill chunk mid-prompt)
            self.launches += launches
            return torch.zeros((0, vocab), dtype=torch.float32)
        logits = ws.take("logits", (n_rows, vocab))
        head = make_norm_matvec(self.lm_head.format, lc.lanes, lc.rows_per_block, d)
        grid, block = self._matvec_grid(vocab, n_rows)
        head[grid, block](x, inputs.logits_rows, self.final_norm, eps, self.lm_head.data, logits)
        self.launches += launches + 1
        return torch.from_numpy(logits.copy_to_host())

    def _attention(
        self, q: Any, kc: Any, vc: Any, out: Any, batch: Any, inputs: _StepInputs, scale: Any
    ) -> int:
        """Decode rows in one launch, then one launch per prefill chunk; returns the count."""
        lc, head_dim, heads = self.launch, self.config.head_dim, self.config.num_heads
        threads = lc.attn_threads
        launches = 0
        b = batch.num_decode
        if b:
            kernel = make_paged_decode_attention(threads, head_dim)
            kernel[max(1, min(b * heads, lc.max_blocks)), threads](
                q[:b], kc, vc, inputs.decode_tables, inputs.decode_lens, scale, out[:b]
            )
            launches += 1
        for p, table in zip(batch.prefills, inputs.prefill_tables, strict=True):
            rows = slice(p.start, p.start + p.length)
            tiles = -(-p.length // threads) * heads
            kernel = make_paged_prefill_attention(threads, head_dim)
            kernel[max(1, min(tiles, lc.max_blocks)), threads](
                q[rows], kc, vc, table, int(p.context_len), scale, out[rows]
            )
            launches += 1
        return launches
