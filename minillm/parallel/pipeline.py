"""One step on one rank: its stage's forward pass over every micro-batch (GPipe fill and drain).

Rank 0's scheduler picks the step's batch; pipeline parallelism splits it into m micro-batches
(`split_schedule`, by sequences, balancing tokens) so the stages overlap: while stage s works on
micro-batch i, stage s+1 works on i-1. Every rank runs `run_stage` on the same list of
ForwardBatches:

    for each micro-batch i:  receive x_i from stage s-1 (unless first)
                             run this stage's layers (TP collectives inside)
                             send the result to stage s+1 (isend: no waiting), or, on the
                             last stage, its logits to rank 0

Each TP rank of a stage talks to the same TP rank of the next stage (the activations are
replicated within a stage). Rank 0 (first stage, and the sampler) receives the logits after
computing its own share. With p stages and m equal micro-batches each stage idles for p - 1 of
the m + p - 1 slots of a step: the bubble (p-1)/(m+p-1). `StepTimes` keeps what happened
(each rank's busy time, rank 0's wall time) so benchmarks can compare it with that formula.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from minillm.engine.scheduler import ScheduledBatch
from minillm.kv.cache import KVCache
from minillm.model.batch import ForwardBatch
from minillm.parallel import traffic
from minillm.parallel.tp_model import ShardedLlamaModel

KEEP_STEPS = 4096  # per-step timings kept on every rank


def split_schedule(sched: ScheduledBatch, num_micro_batches: int) -> list[ScheduledBatch]:
    """At most num_micro_batches contiguous groups of the step's sequences, each about the same
    number of new tokens (one group when there are fewer sequences than that)."""
    n = len(sched)
    m = max(1, min(num_micro_batches, n))
    if m == 1:
        return [sched]
    total = sum(sched.num_new_tokens)
    groups: list[ScheduledBatch] = []
    start, done = 0, 0
    for g in range(m):
        end = start
        target = total * (g + 1) / m
        # take at least one sequence, leave at least one for each remaining group
        while end < n - (m - g - 1) and (end == start or done < target):
            done += sched.num_new_tokens[end]
            end += 1
        if g == m - 1:
            done += sum(sched.num_new_tokens[end:])
            end = n
        groups.append(
            ScheduledBatch(
                seqs=sched.seqs[start:end],
                num_new_tokens=sched.num_new_tokens[start:end],
                blocks_to_copy=[],
            )
        )
        start = end
    return groups


@dataclass
class StepTimes:
    """Per-step timings on one rank: busy = inside this rank's forward passes; wall (rank 0)
    = the whole step, from sending it to the workers to holding every logit."""

    busy_s: deque = field(default_factory=lambda: deque(maxlen=KEEP_STEPS))
    wall_s: deque = field(default_factory=lambda: deque(maxlen=KEEP_STEPS))
    micro_batches: deque = field(default_factory=lambda: deque(maxlen=KEEP_STEPS))

    def clear(self) -> None:
        self.busy_s.clear()
        self.wall_s.clear()
        self.micro_batches.clear()

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "busy_s": list(self.busy_s),
            "wall_s": list(self.wall_s),
            "micro_batches": list(self.micro_batches),
        }


def run_stage(
    model: ShardedLlamaModel,
    kv: KVCache,
    batches: list[ForwardBatch],
    times: StepTimes,
    device: Any = None,
    hidden: bool = False,
) -> list[torch.Tensor]:
    """This rank's part of one step; returns each micro-batch's (S_i, V) logits on rank 0
    (an empty list elsewhere). hidden: an embeddings pass instead, whose result is each
    micro-batch's (T_i, d) final normalised hidden states."""
    pc = model.parallel
    tp = pc.tensor_parallel_size
    hidden_size, vocab = model.full_config.hidden_size, model.full_config.vocab_size
    prev_rank, next_rank = model.rank - tp, model.rank + tp
    last_leader = pc.rank_of(pc.pipeline_parallel_size - 1, 0)
    sends: list[tuple[Any, torch.Tensor]] = []
    outs: list[torch.Tensor] = []
    busy = 0.0
    for i, batch in enumerate(batches):
        if not model.is_first:
            x = torch.empty((batch.num_tokens, hidden_size), dtype=torch.float32, device=device)
            dist.recv(x, src=prev_rank, tag=i)
            model.incoming = x
        t0 = time.perf_counter()
        y = model.stage_hidden(batch, kv.k, kv.v) if hidden else model.forward(batch, kv.k, kv.v)
        busy += time.perf_counter() - t0
        if not model.is_last:
            y = y.contiguous()
            traffic.record("pp_send", y.numel() * y.element_size())
            sends.append((dist.isend(y, dst=next_rank, tag=i), y))
        elif model.rank == 0:  # one stage: rank 0 computed (and gathered) them itself
            outs.append(y)
        elif model.rank == last_leader and y.shape[0]:
            traffic.record("pp_logits_send", y.numel() * y.element_size())
            sends.append((dist.isend(y, dst=0, tag=i), y))
    if model.rank == 0 and not model.is_last:
        for i, batch in enumerate(batches):
            rows = batch.num_tokens if hidden else int(batch.logits_rows.shape[0])
            logits = torch.empty((rows, hidden_size if hidden else vocab), device=device)
            if logits.shape[0]:
                dist.recv(logits, src=last_leader, tag=i)
            outs.append(logits)
    for work, _ in sends:  # the next stage has them by now (or is gone: an error)
        work.wait()
    times.busy_s.append(busy)
    times.micro_batches.append(len(batches))
    return outs


def bubble_formula(pipeline_parallel_size: int, num_micro_batches: int) -> float:
    """GPipe's idle fraction with equal micro-batches: (p - 1) / (m + p - 1)."""
    p, m = pipeline_parallel_size, num_micro_batches
    return (p - 1) / (m + p - 1)
