"""Sentence embeddings from a decoder LLM: mean-pooled final hidden states, L2-normalised.

A chat model is not trained as an embedding model, so these vectors are a baseline (good for
teaching what /v1/embeddings and /api/embed return, weak for retrieval). The recipe:

    ids (T,) -> the model's layers -> final RMSNorm -> h (T, d) -> mean over T -> / ||.||_2

`LlamaModel.forward` only returns the logits of the rows it samples, so the layer loop is
written again here with the model's own layers and the backend's own ops, on a private scratch
KV cache: it never touches the serving engine's cache or blocks, and may run in a worker
thread while the engine thread steps.
"""

from __future__ import annotations

import torch

from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel


@torch.inference_mode()
def hidden_states(model: LlamaModel, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Final (normalised) hidden states (T, d) of one token sequence, causal as in generation."""
    if not ids:
        raise ValueError("cannot embed an empty input: it has no tokens")
    ops, cfg = model.ops, model.config
    t = len(ids)
    num_blocks = -(-t // block_size)
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    table = torch.arange(num_blocks, dtype=torch.long)
    batch = ForwardBatch(
        token_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.arange(t, dtype=torch.long),
        slot_mapping=torch.arange(t, dtype=torch.long),  # block i holds positions i*bs ...
        num_decode=0,
        decode_block_tables=torch.zeros((0, 0), dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[PrefillChunk(0, t, t, table)],
        logits_rows=torch.tensor([t - 1]),
    )
    cos, sin = model.rope_tables(batch.positions)
    x = ops.embedding(batch.token_ids, model.embed)  # (T, d)
    for layer in model.layers:
        kc, vc = torch.zeros(shape), torch.zeros(shape)  # scratch cache, this layer only
        h = ops.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
        q = ops.linear(h, layer.wq, layer.bq).reshape(t, cfg.num_heads, cfg.head_dim)
        k = ops.linear(h, layer.wk, layer.bk).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = ops.linear(h, layer.wv, layer.bv).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        ops.store_kv(k, v, kc, vc, batch.slot_mapping)
        attn = ops.attention_prefill(q, kc, vc, table, t, model.scale)  # (T, H, D)
        x = x + ops.linear(attn.reshape(t, -1), layer.wo)
        h = ops.rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps)
        x = x + ops.linear(
            ops.silu_mul(ops.linear(h, layer.w_gate), ops.linear(h, layer.w_up)), layer.w_down
        )
    return ops.rms_norm(x, model.final_norm, cfg.rms_norm_eps)


def embed(model: LlamaModel, ids: list[int]) -> list[float]:
    """One input's embedding: the mean of its final hidden states, scaled to unit length."""
    pooled = hidden_states(model, ids).float().mean(dim=0)
    return torch.nn.functional.normalize(pooled, dim=0).tolist()


def embed_many(model: LlamaModel, inputs: list[list[int]]) -> list[list[float]]:
    return [embed(model, ids) for ids in inputs]
