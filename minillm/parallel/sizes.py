"""Which tensor-parallel sizes a model allows.

Megatron-style TP gives each rank whole attention heads and whole KV heads (a head's dot
products cannot be split without another all-reduce) and an equal slice of the FFN, so the
size must divide all three. The vocabulary need not divide: shard.py pads it.
"""

from __future__ import annotations

import math

from minillm.config import ModelConfig


def _has_dense_mlp(config: ModelConfig) -> bool:
    """Whether some layer has a dense MLP (an all-MoE model never uses intermediate_size)."""
    return config.moe is None or bool(config.moe.dense_layers)


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every tensor_parallel_size this model can be split into, ascending."""
    g = math.gcd(config.num_heads, config.num_kv_heads)
    if _has_dense_mlp(config):
        g = math.gcd(g, config.intermediate_size)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_tp_size(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ValueError naming the sizes that work when this one does not divide the model."""
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    split = [("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads)]
    if _has_dense_mlp(config):
        split.append(("intermediate_size", config.intermediate_size))
    bad = [f"{name}={value}" for name, value in split if value % tp]
    if bad:
        sizes = ", ".join(str(n) for n in valid_tp_sizes(config))
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide this model's {' and '.join(bad)}; "
            f"each rank needs whole heads, whole KV heads and an equal FFN slice, so use "
            f"one of: {sizes}"
        )


def valid_pp_sizes(config: ModelConfig) -> list[int]:
    """Every pipeline_parallel_size this model allows: each stage needs at least one layer."""
    return list(range(1, config.num_layers + 1))


def check_pp_size(config: ModelConfig, pipeline_parallel_size: int) -> None:
    """Raise ValueError when there are more stages than layers."""
    pp = pipeline_parallel_size
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive integer, got {pp!r}")
    if pp > config.num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp} exceeds this model's {config.num_layers} layers; "
            f"every stage needs at least one layer, so use 1 to {config.num_layers}"
        )


def stage_layers(num_layers: int, pipeline_parallel_size: int, stage: int) -> range:
    """The contiguous global layer indices stage `stage` runs; earlier stages get the extra
    layers when they do not divide (stage 0 also embeds, the last one also projects to the
    vocabulary, so neither end is made the longest on purpose)."""
    base, extra = divmod(num_layers, pipeline_parallel_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))
