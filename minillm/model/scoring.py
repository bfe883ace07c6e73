"""Logits at every position of a text: what perplexity and distillation need.

Generation only needs the last position's logits; scoring needs all of them. This runs the
same forward pass over a scratch paged cache, in chunks, so long texts fit in memory.
"""

from __future__ import annotations

import torch

from minillm.kv.cache import KVCache
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel


def sequence_logits(
    model: LlamaModel, token_ids: list[int], chunk: int = 256, block_size: int = 16
) -> torch.Tensor:
    """(len(token_ids), V) logits: row i predicts token i + 1."""
    cfg, n = model.config, len(token_ids)
    if n == 0:
        raise ValueError("token_ids is empty")
    if n > cfg.max_position_embeddings:
        raise ValueError(f"{n} tokens exceed the model's context of {cfg.max_position_embeddings}")
    num_blocks = -(-n // block_size)
    kv = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    table = torch.arange(num_blocks)
    out = []
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        pos = torch.arange(start, end)
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids[start:end], dtype=torch.long),
            positions=pos,
            slot_mapping=pos,  # block i holds positions [i*bs, (i+1)*bs): slot == position
            num_decode=0,
            decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
            decode_context_lens=torch.zeros(0, dtype=torch.long),
            prefills=[PrefillChunk(0, end - start, end, table)],
            logits_rows=torch.arange(end - start),
        )
        out.append(model.forward(batch, kv.k, kv.v))
    return torch.cat(out)


def token_logprobs(model: LlamaModel, token_ids: list[int], chunk: int = 256) -> torch.Tensor:
    """(len - 1,) log p(token_i | tokens before i) for i >= 1."""
    logits = sequence_logits(model, token_ids, chunk)[:-1]
    targets = torch.tensor(token_ids[1:], dtype=torch.long)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
