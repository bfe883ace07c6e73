"""Context parallelism (CP) for one long prompt: the sequence split over N local processes.

`context_parallel_prefill(model, prompt_ids, world_size)` loads the model in the caller (rank 0)
and in N-1 spawned workers (the weights are replicated: CP splits activations, not weights),
gives each rank its share of the prompt's tokens (the zigzag layout by default, see
ring_attention.py), runs the prefill with ring attention, and returns on rank 0 the last
token's logits and the full K/V of every layer, so decoding can continue in one process
(`decode_step`). The workers are gone when it returns or raises.

`prefill_one_process` is the single-process reference the tests and lesson compare against.

Threads: each worker takes cpu_count // N torch (and, on the cpu backend, Numba) threads. On the
cpu backend Numba's and torch's OpenMP pools spin when idle: on a busy machine set
OMP_WAIT_POLICY=passive before Python starts (measured on 2 cores, 200 tokens, 2 ranks: ring
attention took 6.5 s per rank with spinning pools, 0.15 s with passive ones); ref is unaffected.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.kernels import get_backend, resolve_backend_name
from minillm.loader import load_model, read_model_files
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel
from minillm.parallel.cp_model import ContextParallelLlama, RankOutput, RankReport, run_rank
from minillm.parallel.executor import distributed_timeout_s
from minillm.parallel.ranks import run_on_ranks
from minillm.parallel.ring_attention import SeqLayout, ring_bytes_per_layer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V, (T, KvH, D) each
HOST_BACKENDS = ("ref", "cpu")  # ring attention runs in torch on host tensors


@dataclass
class CPResult:
    logits: torch.Tensor  # (V,) the last prompt token's logits
    kv: KV
    layout: SeqLayout
    reports: list[RankReport]  # one per rank: tokens, times, bytes, causal work
    wall_s: float  # the whole call: spawning and loading included

    @property
    def bytes_sent(self) -> list[int]:
        """K/V bytes each rank sent around the ring (all layers)."""
        return [r.ring_bytes for r in self.reports]

    @property
    def per_rank_time(self) -> list[dict[str, float]]:
        """Where each rank's forward went: ring math, ring waits, everything else."""
        return [
            {
                "forward_s": r.forward_s,
                "attention_s": r.attention_s,
                "ring_wait_s": r.ring_wait_s,
                "other_compute_s": r.other_compute_s,
                "collect_s": r.collect_s,
            }
            for r in self.reports
        ]


def expected_ring_bytes(
    layout: SeqLayout, num_layers: int, kv_heads: int, head_dim: int
) -> list[int]:
    """The formula for `CPResult.bytes_sent`: per rank, layers × the K/V blocks it forwards."""
    return [
        num_layers * ring_bytes_per_layer(layout, r, kv_heads, head_dim)
        for r in range(layout.world_size)
    ]


def _check_prompt(prompt_ids: list[int], vocab_size: int) -> list[int]:
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("the prompt is empty: context-parallel prefill needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def _load_rank(rank: int, world_size: int, path: str, backend: str) -> ContextParallelLlama:
    """A worker's replica of the model (prepare phase)."""
    if backend == "cpu":  # N processes share the cores: Numba's pool too, not only torch's
        import numba

        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    config, weights, _ = read_model_files(Path(path))
    return ContextParallelLlama(config, weights, get_backend(backend), rank)


def _run_rank(model: ContextParallelLlama, layout: SeqLayout, prompt_ids: list[int]) -> object:
    """run phase: rank 0 keeps its tensors; a worker sends back its report only."""
    out = run_rank(model, layout, prompt_ids)
    return out if model.rank == 0 else out.report


def context_parallel_prefill(
    model: str | Path,
    prompt_ids: list[int],
    world_size: int,
    backend: str = "ref",
    layout: str = "zigzag",
    timeout_s: float | None = None,
) -> CPResult:
    """Prefill `prompt_ids` with the sequence split over `world_size` processes.

    layout: "zigzag" (balanced causal work) or "contiguous". timeout_s bounds each
    point-to-point wait (default: $MINILLM_TP_TIMEOUT_S or 120 s)."""
    t0 = time.perf_counter()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    name = resolve_backend_name(backend)
    if name not in HOST_BACKENDS:
        raise ValueError(
            f"context-parallel prefill runs on host backends {HOST_BACKENDS}, got {backend!r}"
        )
    seq = SeqLayout(len(prompt_ids), world_size, layout)  # checks sizes before any loading
    timeout_s = distributed_timeout_s() if timeout_s is None else timeout_s
    loaded = load_model(model, name, build=functools.partial(ContextParallelLlama, rank=0))
    ids = _check_prompt(prompt_ids, loaded.config.vocab_size)
    outputs = run_on_ranks(
        world_size,
        loaded.model,
        _load_rank,
        (str(loaded.path), name),
        _run_rank,
        (seq, ids),
        timeout_s,
    )
    first: RankOutput = outputs[0]
    assert first.logits is not None and first.kv is not None
    reports = [first.report, *outputs[1:]]
    return CPResult(first.logits, first.kv, seq, reports, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- one process
def prefill_one_process(model: LlamaModel, prompt_ids: list[int]) -> tuple[torch.Tensor, KV]:
    """The reference: the whole prompt in one forward on one process; (V,) logits and K/V."""
    cfg, ops = model.config, model.ops
    ids = _check_prompt(prompt_ids, cfg.vocab_size)
    n = len(ids)
    shape = (1, n, cfg.num_kv_heads, cfg.head_dim)
    kc = [ops.allocate_kv_cache(shape) for _ in range(cfg.num_layers)]
    vc = [ops.allocate_kv_cache(shape) for _ in range(cfg.num_layers)]
    batch = ForwardBatch(
        token_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.arange(n),
        slot_mapping=torch.arange(n),
        num_decode=0,
        decode_block_tables=torch.zeros((0, 1), dtype=torch.int64),
        decode_context_lens=torch.zeros(0, dtype=torch.int64),
        prefills=[PrefillChunk(0, n, n, torch.zeros(1, dtype=torch.int64))],
        logits_rows=torch.tensor([n - 1]),
    )
    logits = model.forward(batch, kc, vc)[0].float()
    return logits, [
        (k[0].float().clone(), v[0].float().clone()) for k, v in zip(kc, vc, strict=True)
    ]


def decode_step(model: LlamaModel, kv: KV, token_id: int, block_size: int = 16) -> torch.Tensor:
    """One decode step after a prefill: `token_id` at position T attends to the T cached K/V
    rows (paged, as the engine stores them) and itself; returns its (V,) logits."""
    cfg, ops = model.config, model.ops
    t = int(kv[0][0].shape[0])
    blocks = -(-(t + 1) // block_size)
    shape = (blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    kc, vc = [], []
    for k, v in kv:
        kcache, vcache = ops.allocate_kv_cache(shape), ops.allocate_kv_cache(shape)
        kcache.view(-1, cfg.num_kv_heads, cfg.head_dim)[:t] = k
        vcache.view(-1, cfg.num_kv_heads, cfg.head_dim)[:t] = v
        kc.append(kcache)
        vc.append(vcache)
    batch = ForwardBatch(
        token_ids=torch.tensor([int(token_id)]),
        positions=torch.tensor([t]),
        slot_mapping=torch.tensor([t]),
        num_decode=1,
        decode_block_tables=torch.arange(blocks)[None, :],
        decode_context_lens=torch.tensor([t + 1]),
        prefills=[],
        logits_rows=torch.tensor([0]),
    )
    return model.forward(batch, kc, vc)[0].float()
