"""The Llama forward pass on one tensor-parallel shard: the same code, two collectives more.

Each rank runs LlamaModel's layers on its own heads and FFN slice (shard.py). Two places need
the other ranks:

- after the row-parallel o and down projections, every rank holds a partial sum of the full
  (T, d) output; one all-reduce makes it whole on every rank, so the residual stream (and the
  norms, which need whole rows) stay replicated;
- the vocabulary-parallel lm_head gives each rank (S, ceil(V/N)) logits; rank 0 gathers them
  (only rank 0 samples) and trims the padding.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist

from minillm.config import ModelConfig
from minillm.model.batch import ForwardBatch
from minillm.model.llama import LlamaModel
from minillm.model.weights import ModelWeights
from minillm.parallel import traffic
from minillm.parallel.shard import local_config, shard_weights


class ShardedLlamaModel(LlamaModel):
    """`config` is the shard's (local_config); `full_config` the whole model's."""

    def __init__(
        self,
        full_config: ModelConfig,
        shard: ModelWeights,
        ops: ModuleType,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(local_config(full_config, world_size), shard, ops)
        self.full_config, self.shard = full_config, shard
        self.rank, self.world_size = rank, world_size
        self.fused_decode = False  # a fused backend call would skip the all-reduce hook

    @classmethod
    def from_full(
        cls,
        config: ModelConfig,
        weights: ModelWeights,
        ops: ModuleType,
        rank: int,
        world_size: int,
    ) -> ShardedLlamaModel:
        """Cut rank's shards out of the full weights and build the model on them."""
        return cls(config, shard_weights(weights, config, rank, world_size), ops, rank, world_size)

    def _all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        traffic.record("tp_all_reduce", y.numel() * y.element_size())
        dist.all_reduce(y)  # sum of the ranks' partial products: the full projection
        return y

    def _logits(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """(S, V) on rank 0; the other ranks return their own (S, ceil(V/N)) slice."""
        local = super()._logits(x, batch).contiguous()
        vocab = self.full_config.vocab_size
        if local.shape[0] == 0:  # every rank sees the same batch, so all skip the gather
            return local.new_empty((0, vocab))
        traffic.record("tp_gather", local.numel() * local.element_size())
        if self.rank != 0:
            dist.gather(local, None, dst=0)
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=1)[:, :vocab]

    def hidden_states(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError(
            "embeddings are not supported with tensor_parallel_size > 1 yet (the workers "
            "would have to join the forward pass); use tensor_parallel_size=1"
        )
