"""Cut a model's weights into the shards one tensor-parallel rank holds (Megatron layout).

Shapes: d model dim, H/KvH heads, D head dim, f FFN dim, V vocabulary, N ranks, rank r.

- column parallel (split the *output* rows): wq, wk, wv (and their biases), w_gate, w_up.
  Rank r keeps query heads [r*H/N, (r+1)*H/N) and KV heads [r*KvH/N, (r+1)*KvH/N): contiguous
  slices keep each query head with the KV head it reads (GQA groups never straddle ranks).
  Rows are independent, so quantized blocks are selected as they are (QuantTensor.take_rows).
- row parallel (split the *input* columns): wo and w_down. Each rank's product is a partial
  sum of the full one; tp_model.py all-reduces it. A column slice cuts through quantized
  blocks, so these shards are dequantized to F32 here (exact for the ref backend, which
  computes in fp32 anyway).
- vocabulary parallel: the lm_head (or the tied embedding) is cut into N equal row slices of
  ceil(V/N) rows, the last padded with zero rows; the gathered logits are trimmed back to V.
- replicated: norms and the embedding table (a vocabulary-parallel embedding would need one
  more all-reduce; left for later).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor
from minillm.model.weights import LayerWeights, ModelWeights
from minillm.parallel.sizes import check_tp_size


def local_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config one rank's shard looks like: its own heads, KV heads and FFN slice.

    The vocabulary stays whole: prompts are checked against it and the logits are gathered."""
    check_tp_size(config, world_size)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


def _f32(values: np.ndarray) -> QuantTensor:
    return QuantTensor.from_array(np.ascontiguousarray(values, dtype=np.float32), "F32")


def rows(w: QuantTensor, rank: int, world_size: int) -> QuantTensor:
    """Column parallel: rank's slice of the output rows (a bias: of its elements)."""
    n = w.shape[0]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    if len(w.shape) == 1:
        return _f32(w.dequantize().reshape(-1)[lo:hi])
    return w.take_rows(np.arange(lo, hi))


def columns(w: QuantTensor, rank: int, world_size: int) -> QuantTensor:
    """Row parallel: rank's slice of the input columns, as F32 (see the module docstring)."""
    n = w.shape[-1]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return _f32(w.dequantize().reshape(w.shape)[:, lo:hi])


def vocab_rows(w: QuantTensor, rank: int, world_size: int) -> QuantTensor:
    """Vocabulary parallel: ceil(V/N) rows for every rank, zero rows past the vocabulary."""
    vocab = w.shape[0]
    per = -(-vocab // world_size)
    lo, hi = min(rank * per, vocab), min((rank + 1) * per, vocab)
    out = np.zeros((per, w.shape[-1]), dtype=np.float32)
    out[: hi - lo] = w.take_rows(np.arange(lo, hi)).dequantize().reshape(hi - lo, -1)
    return _f32(out)


def shard_layer(lw: LayerWeights, rank: int, world_size: int) -> LayerWeights:
    def col(b: QuantTensor | None) -> QuantTensor | None:
        return None if b is None else rows(b, rank, world_size)

    return LayerWeights(
        attn_norm=lw.attn_norm,
        wq=rows(lw.wq, rank, world_size),
        wk=rows(lw.wk, rank, world_size),
        wv=rows(lw.wv, rank, world_size),
        wo=columns(lw.wo, rank, world_size),
        ffn_norm=lw.ffn_norm,
        w_gate=rows(lw.w_gate, rank, world_size),
        w_up=rows(lw.w_up, rank, world_size),
        w_down=columns(lw.w_down, rank, world_size),
        bq=col(lw.bq),
        bk=col(lw.bk),
        bv=col(lw.bv),
    )


def shard_weights(
    weights: ModelWeights, config: ModelConfig, rank: int, world_size: int
) -> ModelWeights:
    """Rank's shards of every weight. The lm_head shard is always explicit (tied or not)."""
    check_tp_size(config, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    return ModelWeights(
        embed=weights.embed,
        layers=[shard_layer(lw, rank, world_size) for lw in weights.layers],
        final_norm=weights.final_norm,
        lm_head=vocab_rows(head, rank, world_size),
    )
