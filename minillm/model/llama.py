"""The Llama-family transformer (Llama, SmolLM2, TinyLlama, Qwen2), written once.

Every op goes through the active backend (`minillm.kernels.*`), so the same forward pass runs
on torch (ref), Numba (cpu) or numba.cuda (cuda). Shapes in comments: T tokens, d model dim,
H/KvH heads, D head dim, f FFN dim, V vocab.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from minillm.config import ModelConfig
from minillm.model.batch import ForwardBatch
from minillm.model.moe import ExpertCounts, MoEFeedForward
from minillm.model.weights import ModelWeights


class Layer:
    """One decoder layer's prepared weights. Its FFN is dense (w_gate, w_up, w_down) or, in
    an MoE layer, `moe`: a callable (T, d) -> (T, d) that owns its experts (model/moe.py)."""

    def __init__(self, lw: Any, ops: ModuleType, moe: Any = None) -> None:
        vec, lin = ops.prepare_vector, ops.prepare_linear
        self.attn_norm, self.ffn_norm = vec(lw.attn_norm), vec(lw.ffn_norm)
        self.wq, self.wk, self.wv, self.wo = lin(lw.wq), lin(lw.wk), lin(lw.wv), lin(lw.wo)
        self.bq, self.bk, self.bv = (None if b is None else vec(b) for b in (lw.bq, lw.bk, lw.bv))
        self.moe = moe
        if moe is None:
            self.w_gate, self.w_up, self.w_down = lin(lw.w_gate), lin(lw.w_up), lin(lw.w_down)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: ModuleType) -> None:
        self.config, self.ops = config, ops
        self.embed = ops.prepare_embedding(weights.embed)
        # router statistics of the MoE layers (None for a dense model), see model/moe.py
        self.expert_counts: ExpertCounts | None = None
        moe_layers = [i for i, lw in enumerate(weights.layers) if lw.moe is not None]
        if config.moe is not None and moe_layers:
            self.expert_counts = ExpertCounts(moe_layers, config.moe.num_experts)
        self.layers = [
            Layer(lw, ops, None if lw.moe is None else self.make_moe(lw.moe, moe_layers.index(i)))
            for i, lw in enumerate(weights.layers)
        ]
        self.final_norm = ops.prepare_vector(weights.final_norm)
        self.lm_head = (
            ops.prepare_linear(weights.lm_head)
            if weights.lm_head is not None
            else ops.tied_lm_head(self.embed)
            if hasattr(ops, "tied_lm_head")
            else self.embed
        )
        d = config.head_dim
        self.inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        )
        self.scale = d**-0.5
        # A backend may offer all layers of a decode-only step as one fused call (cpu does:
        # see kernels/cpu_layer.py); set False to run op by op, as the lessons do to compare.
        self.fused_decode = hasattr(ops, "decoder_layers") and not moe_layers
        # A backend may run the whole forward resident on its device (cuda does: see
        # kernels/cuda_resident.py), built on first use; set False to run op by op.
        self.use_resident = hasattr(ops, "resident_forward") and not moe_layers
        self._resident: Any = None

    @property
    def resident(self) -> Any:
        """The backend's resident forward once the first step built it (cuda), else None."""
        return self._resident

    def make_moe(self, weights: Any, row: int) -> Any:
        """An MoE layer's FFN (row: its row in expert_counts); expert parallelism builds one
        that dispatches tokens to other ranks instead (parallel/ep_moe.py)."""
        assert self.config.moe is not None
        return MoEFeedForward(weights, self.config.moe, self.ops, self.expert_counts, row)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, D/2) of each token's rotation angles: position * theta^(-2i/D)."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return torch.cos(angles).float(), torch.sin(angles).float()

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Run the new tokens through all layers, writing their K/V; return (S, V) logits."""
        if self.use_resident and not batch.layer_group and self.ops.resident_accepts(k_caches):
            if self._resident is None:
                self._resident = self.ops.resident_forward(self)
            return self._resident(batch, k_caches, v_caches)
        return self._logits(self._layers(batch, k_caches, v_caches), batch)

    @torch.inference_mode()
    def hidden_states(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """The final, normalised hidden state (T, d) of every new token: what embeddings pool."""
        x = self._layers(batch, k_caches, v_caches)
        return self.ops.rms_norm(x, self.final_norm, self.config.rms_norm_eps)

    def _layers(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Embedding, then every decoder layer: the residual stream (T, d) after the last one."""
        ops, cfg = self.ops, self.config
        t = batch.num_tokens
        cos, sin = self.rope_tables(batch.positions)
        x = self._embed(batch)  # (T, d)
        if self.fused_decode and not batch.prefills:  # the same math, one call per layer
            return ops.decoder_layers(
                x, self.layers, k_caches, v_caches, batch, cos, sin,
                cfg.rms_norm_eps, cfg.num_heads, self.scale,
            )  # fmt: skip
        for layer, kc, vc in zip(self.layers, k_caches, v_caches, strict=True):
            # ---- attention block: x + Wo · attn(rope(Wq·h), rope(Wk·h), Wv·h), h = norm(x)
            h = ops.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            q = ops.linear(h, layer.wq, layer.bq).reshape(t, cfg.num_heads, cfg.head_dim)
            k = ops.linear(h, layer.wk, layer.bk).reshape(t, cfg.num_kv_heads, cfg.head_dim)
            v = ops.linear(h, layer.wv, layer.bv).reshape(t, cfg.num_kv_heads, cfg.head_dim)
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            ops.store_kv(k, v, kc, vc, batch.slot_mapping)
            attn = self._attention(q, kc, vc, batch)  # (T, H, D)
            x = x + self._all_reduce(ops.linear(attn.reshape(t, -1), layer.wo))
            # ---- feed-forward block (SwiGLU): x + W_down · (silu(W_gate·h) * W_up·h)
            h = ops.rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps)
            if layer.moe is not None:  # routed experts (model/moe.py): x + sum_j w_j · E_j(h)
                x = x + layer.moe(h)
                continue
            gate_up = ops.silu_mul(ops.linear(h, layer.w_gate), ops.linear(h, layer.w_up))
            x = x + self._all_reduce(ops.linear(gate_up, layer.w_down))
        return x

    def _embed(self, batch: ForwardBatch) -> torch.Tensor:
        """The residual stream entering the first layer: the token embeddings here; a later
        pipeline stage takes the previous stage's output instead (parallel/tp_model.py)."""
        return self.ops.embedding(batch.token_ids, self.embed)

    def _all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The output of a row-parallel projection (o, down): whole already on one process; a
        tensor-parallel shard sums it over the ranks here (parallel/tp_model.py)."""
        return y

    def _logits(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """(S, V): only the rows that will be sampled need the (big) vocabulary projection."""
        h = self.ops.rms_norm(x[batch.logits_rows], self.final_norm, self.config.rms_norm_eps)
        return self.ops.linear(h, self.lm_head)

    def _attention(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        ops = self.ops
        parts = []
        if batch.num_decode:
            parts.append(
                ops.attention_decode_paged(
                    q[: batch.num_decode],
                    kc,
                    vc,
                    batch.decode_block_tables,
                    batch.decode_context_lens,
                    self.scale,
                )
            )
        for p in batch.prefills:
            parts.append(
                ops.attention_prefill(
                    q[p.start : p.start + p.length],
                    kc,
                    vc,
                    p.block_table,
                    p.context_len,
                    self.scale,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
