"""A trainable Llama in plain torch: the student of knowledge distillation.

The engine's `LlamaModel` runs inference only (no autograd, a paged KV cache). Training a
student needs an ordinary `nn.Module`: this one computes the same function (RMSNorm, rotate-half
RoPE, grouped-query attention, SwiGLU) for whole sequences, and converts to and from the
engine's `ModelWeights`, so a student can start from some of the teacher's own layers and end
as a Hugging Face folder that `LLM(path)` and `transformers` load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor, quantize
from minillm.model.weights import LayerWeights, ModelWeights


def _param(q: QuantTensor | None) -> nn.Parameter | None:
    if q is None:
        return None
    values = np.array(q.dequantize(), dtype=np.float32)
    return nn.Parameter(torch.from_numpy(values.reshape(q.shape)))


def _quant(p: torch.Tensor | None) -> QuantTensor | None:
    return None if p is None else quantize(p.detach().float().contiguous().numpy(), "F32")


class RMSNorm(nn.Module):
    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, config: ModelConfig, lw: LayerWeights) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(_param(lw.attn_norm), config.rms_norm_eps)
        self.ffn_norm = RMSNorm(_param(lw.ffn_norm), config.rms_norm_eps)
        self.wq, self.wk, self.wv, self.wo = (_param(lw.wq), _param(lw.wk), _param(lw.wv),
                                              _param(lw.wo))  # fmt: skip
        self.bq, self.bk, self.bv = _param(lw.bq), _param(lw.bk), _param(lw.bv)
        self.w_gate, self.w_up, self.w_down = _param(lw.w_gate), _param(lw.w_up), _param(lw.w_down)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b, t, _ = x.shape
        h = self.attn_norm(x)
        lin = nn.functional.linear
        q = lin(h, self.wq, self.bq).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = lin(h, self.wk, self.bk).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = lin(h, self.wv, self.bv).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        group = cfg.num_heads // cfg.num_kv_heads  # each KV head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + lin(attn.transpose(1, 2).reshape(b, t, -1), self.wo)
        h = self.ffn_norm(x)
        return x + lin(nn.functional.silu(lin(h, self.w_gate)) * lin(h, self.w_up), self.w_down)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by each position's angle; x (B, H, T, D), cos/sin (T, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class StudentLlama(nn.Module):
    """Llama/Qwen2 forward for training: ids (B, T) -> logits (B, T, V) and hidden states."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        super().__init__()
        if len(weights.layers) != config.num_layers:
            raise ValueError(
                f"config has {config.num_layers} layers, weights {len(weights.layers)}"
            )
        self.config = config
        self.embed = _param(weights.embed)
        self.blocks = nn.ModuleList(Block(config, lw) for lw in weights.layers)
        self.final_norm = RMSNorm(_param(weights.final_norm), config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else _param(weights.lm_head)
        d = config.head_dim
        self.register_buffer(
            "inv_freq",
            1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
            persistent=False,
        )

    @classmethod
    def from_teacher(
        cls, config: ModelConfig, weights: ModelWeights, layer_ids: Sequence[int]
    ) -> StudentLlama:
        """A student made of some of the teacher's layers (in order), sharing its vocabulary."""
        if not layer_ids or any(not 0 <= i < config.num_layers for i in layer_ids):
            raise ValueError(f"layer_ids must be non-empty indices into {config.num_layers} layers")
        if list(layer_ids) != sorted(set(layer_ids)):
            raise ValueError(f"layer_ids must be increasing and distinct, got {list(layer_ids)}")
        small = replace(config, num_layers=len(layer_ids))
        chosen = [weights.layers[i] for i in layer_ids]
        return cls(small, ModelWeights(weights.embed, chosen, weights.final_norm, weights.lm_head))

    def forward(self, ids: torch.Tensor, return_hidden: bool = False):  # noqa: ANN201
        """logits (B, T, V); with return_hidden, also the residual stream after each block."""
        t = ids.shape[1]
        angles = torch.arange(t, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
        x = self.embed[ids]
        hidden = []
        for block in self.blocks:
            x = block(x, cos, sin)
            hidden.append(x)
        head = self.embed if self.lm_head is None else self.lm_head
        logits = nn.functional.linear(self.final_norm(x), head)
        return (logits, hidden) if return_hidden else logits

    def to_weights(self) -> ModelWeights:
        """The trained parameters as the engine's ModelWeights (fp32)."""
        layers = [
            LayerWeights(
                attn_norm=_quant(b.attn_norm.weight), wq=_quant(b.wq), wk=_quant(b.wk),
                wv=_quant(b.wv), wo=_quant(b.wo), ffn_norm=_quant(b.ffn_norm.weight),
                w_gate=_quant(b.w_gate), w_up=_quant(b.w_up), w_down=_quant(b.w_down),
                bq=_quant(b.bq), bk=_quant(b.bk), bv=_quant(b.bv),
            )
            for b in self.blocks
        ]  # fmt: skip
        return ModelWeights(_quant(self.embed), layers, _quant(self.final_norm.weight),
                            _quant(self.lm_head))  # fmt: skip

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over the teacher, first and last included."""
    if not 0 < keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}, got {keep}")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})
