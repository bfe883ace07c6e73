"""Cut a model's weights into the shards one tensor-parallel rank holds (Megatron layout).

Shapes: d model dim, H/KvH heads, D head dim, f FFN dim, V vocabulary, N ranks, rank r.

- column parallel (split the *output* rows): wq, wk, wv (and their biases), w_gate, w_up.
  Rank r keeps query heads [r*H/N, (r+1)*H/N) and KV heads [r*KvH/N, (r+1)*KvH/N): contiguous
  slices keep each query head with the KV head it reads (GQA groups never straddle ranks).
  Rows are independent, so quantized blocks are selected as they are (QuantTensor.take_rows).
- row parallel (split the *input* columns): wo and w_down. Each rank's product is a partial
  sum of the full one; tp_model.py all-reduces it. A row of a quantized matrix is a run of
  blocks (32 weights for Q8_0/Q4_0/Q4_1/Q5_0, 256 for Q4_K/Q6_K), so when each rank's slice
  starts and ends on a block boundary the slice is a byte slice of every row and the shard
  stays quantized (the cpu backend computes on the very same blocks as one process). When it
  does not (SmolLM2's wo has 576 inputs: 192 per rank at tp=3, not a multiple of Q4_K's 256),
  that one matrix is dequantized to F32: a block cannot be cut without re-quantizing it, which
  would change the numbers; F32 keeps them exact at 4 bytes per weight (`split_reason` says
  which matrices and why).
- vocabulary parallel: the lm_head (or the tied embedding) is cut into N equal row slices of
  ceil(V/N) rows, the last padded with zero rows (all-zero blocks decode to 0 in every
  format, so the shard stays quantized); the gathered logits are trimmed back to V.
- replicated: norms and the embedding table (a vocabulary-parallel embedding would need one
  more all-reduce; left for later).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minillm.config import ModelConfig
from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor
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


def column_split_reason(w: QuantTensor, world_size: int) -> str | None:
    """None when w's input columns split over world_size ranks on block boundaries; else why
    that matrix is dequantized to F32 instead (see the module docstring)."""
    per_block = BLOCK_LAYOUT[w.format][0]
    n = w.shape[-1]
    if n % world_size == 0 and (n // world_size) % per_block == 0:
        return None
    return (
        f"{n} input columns over {world_size} ranks is {n / world_size:g} per rank, not a "
        f"multiple of {w.format}'s block of {per_block} weights"
    )


def columns(w: QuantTensor, rank: int, world_size: int) -> QuantTensor:
    """Row parallel: rank's slice of the input columns, in w's own format when the slice is
    whole blocks, else as F32 (see column_split_reason)."""
    n = w.shape[-1]
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    if column_split_reason(w, world_size) is None:
        per_block, block_bytes = BLOCK_LAYOUT[w.format]
        b0, b1 = lo // per_block * block_bytes, hi // per_block * block_bytes
        data = np.ascontiguousarray(w.data[:, b0:b1])
        return QuantTensor(w.format, data, (*w.shape[:-1], hi - lo))
    return _f32(w.dequantize().reshape(w.shape)[:, lo:hi])


def vocab_rows(w: QuantTensor, rank: int, world_size: int) -> QuantTensor:
    """Vocabulary parallel: ceil(V/N) rows for every rank, zero rows past the vocabulary."""
    vocab = w.shape[0]
    per = -(-vocab // world_size)
    lo, hi = min(rank * per, vocab), min((rank + 1) * per, vocab)
    data = np.zeros((per, w.data.shape[1]), dtype=np.uint8)  # zero blocks decode to 0
    data[: hi - lo] = w.data[lo:hi]
    return QuantTensor(w.format, data, (per, w.shape[-1]))


def shard_layer(lw: LayerWeights, rank: int, world_size: int) -> LayerWeights:
    """An MoE layer has no dense FFN; its routed experts pass through whole here and are cut
    by parallel/ep_moe.shard_experts (whole experts per rank, or a slice of every expert)."""

    def col(b: QuantTensor | None) -> QuantTensor | None:
        return None if b is None else rows(b, rank, world_size)

    def row(w: QuantTensor | None) -> QuantTensor | None:
        return None if w is None else columns(w, rank, world_size)

    # replace, not rebuild: fields this split does not touch (norms, an MoE layer's experts,
    # per-head q/k norms) are replicated as they are
    return dataclasses.replace(
        lw,
        wq=col(lw.wq),
        wk=col(lw.wk),
        wv=col(lw.wv),
        wo=row(lw.wo),
        w_gate=col(lw.w_gate),
        w_up=col(lw.w_up),
        w_down=row(lw.w_down),
        bq=col(lw.bq),
        bk=col(lw.bk),
        bv=col(lw.bv),
    )


def split_reasons(weights: ModelWeights, world_size: int) -> dict[str, str]:
    """{tensor kind: why it is dequantized to F32} for the row-parallel matrices whose input
    columns do not split on block boundaries (empty when every shard stays quantized)."""
    out: dict[str, str] = {}
    for lw in weights.layers[:1]:  # every layer has the same shapes and formats
        for name in ("wo", "w_down"):
            w = getattr(lw, name)
            why = None if w is None else column_split_reason(w, world_size)
            if why is not None and world_size > 1:
                out[name] = why
    return out


def shard_weights(
    weights: ModelWeights,
    config: ModelConfig,
    rank: int,
    world_size: int,
    layers: range | None = None,
) -> ModelWeights:
    """Rank's shards of every weight (of `layers` only, for a pipeline stage). The lm_head
    shard is always explicit (tied or not)."""
    check_tp_size(config, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    keep = range(len(weights.layers)) if layers is None else layers
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    return ModelWeights(
        embed=weights.embed,
        layers=[shard_layer(weights.layers[i], rank, world_size) for i in keep],
        final_norm=weights.final_norm,
        lm_head=vocab_rows(head, rank, world_size),
    )
