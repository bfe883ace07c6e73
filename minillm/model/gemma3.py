"""Gemma 3: the Llama-family decoder with Gemma's six differences (see config_gemma3.py).

Per layer, with x the residual stream and every norm an RMSNorm whose GGUF weight already
holds Gemma's (1 + w):

    h = norm_attn(x)
    q, k = norm_q(Wq·h), norm_k(Wk·h)             per head (QK-norm), then RoPE with the
                                                  layer's base: local 10k, global 1e6
    a = attn(q, k, Wv·h)                          scale query_pre_attn_scalar^-0.5; a local
                                                  layer sees only its last `window` positions
    x = x + norm_post_attn(Wo·a)
    x = x + norm_post_ffn(W_down·(gelu_tanh(W_gate·h') * W_up·h')),  h' = norm_ffn(x)

The input is embed(ids) * sqrt(d); the logits are soft-capped when the config says so. Every
op still goes through the backend, so ref and cpu run it unchanged. The decode step runs op
by op (the cpu backend's fused layer is Llama's math).
"""

from __future__ import annotations

import inspect
import math
from types import ModuleType

import torch

from minillm.config import ModelConfig
from minillm.model.batch import ForwardBatch
from minillm.model.llama import LlamaModel
from minillm.model.weights import ModelWeights

_NEEDED_OPS = ("gelu_tanh_mul",)


def check_backend(ops: ModuleType) -> None:
    """Gemma 3 needs GeGLU and windowed attention: say so before any weight is prepared."""
    missing = [name for name in _NEEDED_OPS if not hasattr(ops, name)]
    for name in ("attention_prefill", "attention_decode_paged"):
        if "window" not in inspect.signature(getattr(ops, name)).parameters:
            missing.append(f"{name}(window=)")
    if missing:
        raise ValueError(
            f"the {getattr(ops, 'name', ops.__name__)!r} backend cannot run Gemma 3: it lacks "
            f"{', '.join(missing)}; use backend 'cpu' or 'ref'"
        )


class Gemma3Model(LlamaModel):
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: ModuleType) -> None:
        if config.gemma3 is None:
            raise ValueError(f"Gemma3Model needs a gemma3 config, got arch {config.arch!r}")
        check_backend(ops)
        super().__init__(config, weights, ops)
        opts = self.options = config.gemma3
        for layer, lw in zip(self.layers, weights.layers, strict=True):
            for name in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
                w = getattr(lw, name)
                if w is None:
                    raise ValueError(f"a Gemma 3 layer lacks its {name} weight")
                setattr(layer, name, ops.prepare_vector(w))
        d = config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
        self.inv_freq_local = 1.0 / (opts.rope_local_theta**exponents)  # global: self.inv_freq
        self.scale = opts.query_pre_attn_scalar**-0.5
        # HF multiplies in the weights' dtype: sqrt(d) rounded to float32 is the reference
        self.embed_scale = float(torch.tensor(math.sqrt(config.hidden_size), dtype=torch.float32))
        self.fused_decode = self.use_resident = False  # both are Llama's math
        # each layer's window (0: global), from which the engine groups the KV (kv/layout.py)
        self.layer_windows = [opts.window(i) for i in range(config.num_layers)]

    def _embed(self, batch: ForwardBatch) -> torch.Tensor:
        return self.ops.embedding(batch.token_ids, self.embed) * self.embed_scale

    def _local_rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[:, None] * self.inv_freq_local[None, :]
        return torch.cos(angles).float(), torch.sin(angles).float()

    def _layers(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        ops, cfg, opts = self.ops, self.config, self.options
        t, eps = batch.num_tokens, cfg.rms_norm_eps
        global_rope = self.rope_tables(batch.positions)  # base rope_theta (1e6)
        local_rope = self._local_rope_tables(batch.positions)  # base rope_local_theta (10k)
        x = self._embed(batch)  # (T, d)
        for i, (layer, kc, vc) in enumerate(zip(self.layers, k_caches, v_caches, strict=True)):
            window = opts.window(i)  # 0 in a global layer
            cos, sin = local_rope if window else global_rope
            # ---- attention: x + norm(Wo · attn(rope(norm(Wq·h)), rope(norm(Wk·h)), Wv·h))
            h = ops.rms_norm(x, layer.attn_norm, eps)
            q = ops.linear(h, layer.wq).reshape(t, cfg.num_heads, cfg.head_dim)
            k = ops.linear(h, layer.wk).reshape(t, cfg.num_kv_heads, cfg.head_dim)
            v = ops.linear(h, layer.wv).reshape(t, cfg.num_kv_heads, cfg.head_dim)
            q = ops.rope(ops.rms_norm(q, layer.q_norm, eps), cos, sin)
            k = ops.rope(ops.rms_norm(k, layer.k_norm, eps), cos, sin)
            view = batch.for_layer(i)  # its KV group's slots and block tables
            ops.store_kv(k, v, kc, vc, view.slot_mapping)
            attn = self._windowed_attention(q, kc, vc, view, window)  # (T, H, D)
            out = ops.linear(attn.reshape(t, -1), layer.wo)
            x = x + ops.rms_norm(out, layer.post_attn_norm, eps)
            # ---- feed-forward (GeGLU): x + norm(W_down · (gelu(W_gate·h) * W_up·h))
            h = ops.rms_norm(x, layer.ffn_norm, eps)
            act = ops.gelu_tanh_mul(ops.linear(h, layer.w_gate), ops.linear(h, layer.w_up))
            x = x + ops.rms_norm(ops.linear(act, layer.w_down), layer.post_ffn_norm, eps)
        return x

    def _windowed_attention(
        self,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        batch: ForwardBatch,
        window: int,
    ) -> torch.Tensor:
        """LlamaModel._attention with a sliding window (0: the whole context)."""
        ops = self.ops
        parts = []
        if batch.num_decode:
            parts.append(
                ops.attention_decode_paged(
                    q[: batch.num_decode], kc, vc, batch.decode_block_tables,
                    batch.decode_context_lens, self.scale, window=window,
                )
            )  # fmt: skip
        for p in batch.prefills:
            parts.append(
                ops.attention_prefill(
                    q[p.start : p.start + p.length], kc, vc, p.block_table, p.context_len,
                    self.scale, window=window,
                )
            )  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _logits(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        logits = super()._logits(x, batch)
        cap = self.options.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
