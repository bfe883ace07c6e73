"""One MoE layer, expert-parallel on N local processes: what lesson 14 and the tests look at.

`expert_parallel_layer(path, layer, hidden, N)` loads an HF MoE folder on every rank, gives
each rank its share of that layer's experts (ep_moe.shard_moe), and runs the same (T, d)
hidden states through the ExpertParallelMoE layer on all ranks at once (parallel/ranks.py).
Each rank returns its output, the layer's tokens-per-expert counts and the bytes it handed to
the collectives, so a caller can compare them with one process and with the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.config import ModelConfig
from minillm.kernels import get_backend
from minillm.model.moe import ExpertCounts
from minillm.model.weights import load_hf_weights
from minillm.parallel import traffic
from minillm.parallel.ep_moe import ExpertParallelMoE, check_expert_parallel, shard_moe
from minillm.parallel.ranks import run_on_ranks


@dataclass
class RankResult:
    output: torch.Tensor  # (T, d): the layer's output on this rank (the same on every rank)
    counts: torch.Tensor  # (E,): tokens routed to each expert (the whole batch's)
    traffic: dict[str, dict[str, int]]  # traffic.snapshot() of this rank's calls
    experts: list[int]  # the expert ids this rank held


def _prepare(rank: int, world_size: int, path: str, layer: int, backend: str) -> Any:
    cfg = ModelConfig.from_hf_config(Path(path) / "config.json")
    check_expert_parallel(cfg, world_size)
    lw = load_hf_weights(Path(path), cfg).layers[layer]
    if lw.moe is None or cfg.moe is None:
        raise ValueError(f"layer {layer} of {path} is dense; pick an MoE layer")
    counts = ExpertCounts([layer], cfg.moe.num_experts)
    part = shard_moe(lw.moe, rank, world_size, expert_parallel=True)
    moe = ExpertParallelMoE(
        part, cfg.moe, get_backend(backend), rank, world_size, lambda: None, counts, 0
    )
    return moe, counts


def _run(state: Any, hidden: torch.Tensor) -> RankResult:
    moe, counts = state
    before = traffic.snapshot()  # this process's counters go on; report only this call's
    out = moe(hidden)
    spent = {
        kind: {key: n - before.get(kind, {}).get(key, 0) for key, n in v.items()}
        for kind, v in traffic.snapshot().items()
    }
    return RankResult(out, counts.counts[0].clone(), spent, list(moe.local.experts))


def expert_parallel_layer(
    path: str | Path,
    layer: int,
    hidden: torch.Tensor,
    world_size: int,
    backend: str = "ref",
    timeout_s: float = 120.0,
) -> list[RankResult]:
    """Run MoE layer `layer` of the HF folder `path` on `world_size` ranks; one result each."""
    state0 = _prepare(0, world_size, str(path), layer, backend)  # bad sizes fail before spawning
    return run_on_ranks(
        world_size,
        state0,
        _prepare,
        (str(path), layer, backend),
        _run,
        (hidden,),
        timeout_s,
        what="expert-parallel worker",
    )
