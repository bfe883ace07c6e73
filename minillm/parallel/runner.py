"""Rank 0's ModelRunner under tensor parallelism: every step goes to every rank.

The scheduler (rank 0 only) decided the batch and the block tables, so the workers need no
scheduler of their own: they get the flattened ForwardBatch and the copy-on-write block pairs,
and apply them to their own shard of the KV cache, whose block ids mean the same on every rank.
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


class StepExecutor(Protocol):
    """What runs one step on every rank (executor.TensorParallelExecutor)."""

    def run_step(
        self,
        blocks_to_copy: list[tuple[int, int]],
        batch: ForwardBatch,
        model: LlamaModel,
        kv_cache: KVCache,
    ) -> torch.Tensor: ...


class TensorParallelRunner(ModelRunner):
    def __init__(self, model: LlamaModel, kv_cache: KVCache, executor: StepExecutor) -> None:
        super().__init__(model, kv_cache)
        self.executor = executor

    def execute(self, sched: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        batch, to_sample = self.build_batch(sched)
        logits = self.executor.run_step(sched.blocks_to_copy, batch, self.model, self.kv_cache)
        return logits, to_sample
