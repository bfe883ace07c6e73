"""Sentence embeddings from a decoder LLM: mean-pooled final hidden states, L2-normalised.

A chat model is not trained as an embedding model, so these vectors are a baseline (good for
teaching what /v1/embeddings and /api/embed return, weak for retrieval). The recipe:

    ids (T,) -> LlamaModel.hidden_states (all layers, final RMSNorm) -> h (T, d)
             -> mean over T -> / ||h||_2

The forward pass is the model's own; only the KV cache is a scratch one, so an embedding never
takes blocks from the engine's cache. One scratch array serves every layer: a layer writes all
T of its K/V before its attention reads them, and the next layer overwrites them.
"""

from __future__ import annotations

import torch

from minillm.kv.cache import host_kv_cache
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel

SCRATCH_BLOCK_SIZE = 16


def prefill_batch(ids: list[int], block_size: int = SCRATCH_BLOCK_SIZE) -> ForwardBatch:
    """One whole prompt as one causal chunk, on blocks 0, 1, ... of a private cache."""
    t = len(ids)
    table = torch.arange(-(-t // block_size), dtype=torch.long)
    return ForwardBatch(
        token_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.arange(t, dtype=torch.long),
        slot_mapping=torch.arange(t, dtype=torch.long),  # block i holds positions i*bs ...
        num_decode=0,
        decode_block_tables=torch.zeros((0, 0), dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[PrefillChunk(0, t, t, table)],
        logits_rows=torch.tensor([t - 1]),
    )


@torch.inference_mode()
def embed(model: LlamaModel, ids: list[int]) -> list[float]:
    """One input's embedding: the mean of its final hidden states, scaled to unit length."""
    if not ids:
        raise ValueError("cannot embed an empty input: it has no tokens")
    cfg, bs = model.config, SCRATCH_BLOCK_SIZE
    shape = (-(-len(ids) // bs), bs, cfg.num_kv_heads, cfg.head_dim)
    allocate = getattr(model.ops, "allocate_kv_cache", host_kv_cache)
    kc, vc = allocate(shape), allocate(shape)
    layers = len(model.layers)
    hidden = model.hidden_states(prefill_batch(ids, bs), [kc] * layers, [vc] * layers)
    pooled = torch.as_tensor(hidden).float().mean(dim=0)
    return torch.nn.functional.normalize(pooled, dim=0).tolist()


def embed_many(model: LlamaModel, inputs: list[list[int]]) -> list[list[float]]:
    return [embed(model, ids) for ids in inputs]
