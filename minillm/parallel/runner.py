"""Rank 0's ModelRunner under TP and/or PP: every step goes to every rank.

The scheduler (rank 0 only) decided the batch and the block tables, so the workers need no
scheduler of their own: they get the flattened ForwardBatches (one per pipeline micro-batch)
and the copy-on-write block pairs, and apply them to their own KV cache, whose block ids mean
the same on every rank. The logits of the micro-batches come back in order, so they line up
with the sequences to sample exactly as one batch's would.
"""

from __future__ import annotations

from typing import Protocol

import torch

from minillm.engine.runner import ModelRunner
from minillm.engine.scheduler import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.kv.cache import KVCache
from minillm.model.batch import ForwardBatch
from minillm.model.llama import LlamaModel
from minillm.parallel.pipeline import split_schedule


class StepExecutor(Protocol):
    """What runs one step on every rank (executor.ParallelExecutor)."""

    num_micro_batches: int

    def run_step(
        self,
        blocks_to_copy: list[tuple[int, int]],
        batches: list[ForwardBatch],
        model: LlamaModel,
        kv_cache: KVCache,
    ) -> list[torch.Tensor]: ...


class ParallelRunner(ModelRunner):
    def __init__(self, model: LlamaModel, kv_cache: KVCache, executor: StepExecutor) -> None:
        super().__init__(model, kv_cache)
        self.executor = executor

    def execute(self, sched: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        built = [
            self.build_batch(s) for s in split_schedule(sched, self.executor.num_micro_batches)
        ]
        batches = [b for b, _ in built]
        logits = self.executor.run_step(sched.blocks_to_copy, batches, self.model, self.kv_cache)
        to_sample = [seq for _, seqs in built for seq in seqs]
        return (logits[0] if len(logits) == 1 else torch.cat(logits)), to_sample


TensorParallelRunner = ParallelRunner  # the name before pipeline parallelism existed
