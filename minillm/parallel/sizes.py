"""Which tensor-parallel sizes a model allows.

Megatron-style TP gives each rank whole attention heads and whole KV heads (a head's dot
products cannot be split without another all-reduce) and an equal slice of the FFN, so the
size must divide all three. The vocabulary need not divide: shard.py pads it.
"""

from __future__ import annotations

import math

from minillm.config import ModelConfig


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every tensor_parallel_size this model can be split into, ascending."""
    g = math.gcd(config.num_heads, config.num_kv_heads, config.intermediate_size)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_tp_size(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ValueError naming the sizes that work when this one does not divide the model."""
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    bad = [
        f"{name}={value}"
        for name, value in (
            ("num_heads", config.num_heads),
            ("num_kv_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        )
        if value % tp
    ]
    if bad:
        sizes = ", ".join(str(n) for n in valid_tp_sizes(config))
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide this model's {' and '.join(bad)}; "
            f"each rank needs whole heads, whole KV heads and an equal FFN slice, so use "
            f"one of: {sizes}"
        )
