"""KV-cache int8: what storing K and V in 8 bits costs in quality, and saves in memory.

Serving engines (LMDeploy's ``quant_policy=8``, vLLM's ``kv_cache_dtype="int8"/"fp8"``) keep
the KV cache in 8 bits because at long contexts and big batches the cache, not the weights,
fills the GPU. The usual int8 scheme quantizes each token's vector of each head on its own
(one absmax scale per token per head): K and V are written once and read many times, and a
per-token scale needs no calibration.

This module measures the *quality* effect without changing the engine: `kv_int8_ops(ops)` is
the backend with a `store_kv` that rounds K and V to int8 (per token, per head) and writes the
dequantized values. Attention then reads exactly the numbers an int8 cache would hand back
after dequantization, so perplexity is what real int8 storage gives; the memory saving is
computed (`kv_bytes_per_token`), not realised, because the engine's cache stays fp32.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import torch

from minillm.config import ModelConfig


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, KvH, D) -> (q int8 (T, KvH, D), scale (T, KvH, 1)): one absmax scale per head."""
    if x.ndim != 3:
        raise ValueError(
            f"expected K or V of shape (tokens, kv_heads, head_dim), got {tuple(x.shape)}"
        )
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_kv_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quantize_kv_int8(x: torch.Tensor) -> torch.Tensor:
    return dequantize_kv_int8(*quantize_kv_int8(x))


def kv_int8_ops(ops: ModuleType) -> SimpleNamespace:
    """`ops` with K and V rounded through int8 on their way into the cache."""
    wrapped = SimpleNamespace(**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")})

    def store_kv(k, v, k_cache, v_cache, slot_mapping):  # noqa: ANN001, ANN202 - as ops.store_kv
        ops.store_kv(
            fake_quantize_kv_int8(k), fake_quantize_kv_int8(v), k_cache, v_cache, slot_mapping
        )

    wrapped.store_kv = store_kv
    wrapped.name = f"{getattr(ops, 'name', 'ops')}+kv_int8"
    return wrapped


def kv_bytes_per_token(config: ModelConfig, dtype: str = "fp32", scale_bytes: int = 2) -> int:
    """Cache bytes per token over all layers: K and V, plus one scale per head when int8."""
    per_head = {"fp32": 4 * config.head_dim, "fp16": 2 * config.head_dim,
                "int8": config.head_dim + scale_bytes}  # fmt: skip
    if dtype not in per_head:
        raise ValueError(f"unknown KV dtype {dtype!r}; choose fp32, fp16 or int8")
    return 2 * config.num_layers * config.num_kv_heads * per_head[dtype]
