"""The Llama forward pass on one rank's part of the model: the same code, a few hooks more.

A rank holds one tensor-parallel shard (shard.py) of one pipeline stage's layers
(sizes.stage_layers). LlamaModel's forward runs unchanged; the hooks add what the split needs:

- `_all_reduce` (TP): after the row-parallel o and down projections every rank of the stage
  holds a partial sum of the full (T, d) output; one all-reduce over the stage's TP group makes
  it whole, so the residual stream (and the norms, which need whole rows) stay replicated;
- `_embed` (PP): a stage after the first starts from the activations the previous stage sent
  (`incoming`, set by pipeline.py) instead of the embedding table, which it does not hold;
- `_logits`: a stage before the last returns its (T, d) activations for the next stage; the
  last stage's vocabulary-parallel lm_head gives each TP rank (S, ceil(V/N)) logits, which the
  stage's TP rank 0 gathers and trims to (S, V);
- `hidden_states` (embeddings): rank 0 hands the pass to the executor, which runs
  `stage_hidden` on every rank (pipeline.run_stage with hidden=True) and returns the last
  stage's normalised (T, d) hidden states.

Only the first stage keeps the embedding and only the last the final norm and lm_head: the
others are built with a one-row placeholder table that is dropped right away.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from minillm.config import ModelConfig
from minillm.model.batch import ForwardBatch
from minillm.model.llama import LlamaModel
from minillm.model.weights import ModelWeights
from minillm.parallel import traffic
from minillm.parallel.config import ParallelConfig
from minillm.parallel.ep_moe import check_moe_split, parallel_moe, shard_experts
from minillm.parallel.shard import local_config, shard_weights
from minillm.parallel.sizes import check_pp_size, stage_layers


class ShardedLlamaModel(LlamaModel):
    """`config` is this rank's (its heads, FFN slice and stage's layers); `full_config` the
    whole model's. `tp_group`: the stage's TP process group (None: the default group, when
    there is one stage); `tp_leader`: the global rank of the stage's TP rank 0."""

    def __init__(
        self,
        full_config: ModelConfig,
        weights: ModelWeights,
        ops: ModuleType,
        rank: int,
        parallel: ParallelConfig,
    ) -> None:
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        check_pp_size(full_config, pp)
        self.parallel, self.rank = parallel, rank
        self.tp_rank, self.stage = parallel.tp_rank(rank), parallel.pp_rank(rank)
        self.layer_ids = stage_layers(full_config.num_layers, pp, self.stage)  # global indices
        self.is_first, self.is_last = self.stage == 0, self.stage == pp - 1
        check_moe_split(full_config, parallel)  # MoE layers: parallel/ep_moe.py
        shard = shard_weights(weights, full_config, self.tp_rank, tp, self.layer_ids)
        shard = shard_experts(shard, self.tp_rank, tp, parallel.enable_expert_parallel)
        placeholder = weights.embed.take_rows(np.arange(1))
        shard.embed = weights.embed if self.is_first else placeholder
        if not self.is_last:
            shard.lm_head = placeholder
        cfg = local_config(full_config, tp)
        cfg = dataclasses.replace(cfg, num_layers=len(self.layer_ids))
        super().__init__(cfg, shard, ops)
        self.full_config, self.shard = full_config, shard
        if not self.is_first:
            self.embed = None
        if not self.is_last:
            self.lm_head = self.final_norm = None
        self.world_size = tp  # the TP degree (what the all-reduce and the gather span)
        # a fused backend call would skip the all-reduce hook; PP alone can keep it
        self.fused_decode = self.fused_decode and tp == 1
        self.use_resident = False  # a shard's forward has hooks (embed, all-reduce) it skips
        self.tp_group: Any = None
        self.tp_leader = parallel.rank_of(self.stage, 0)
        self.incoming: torch.Tensor | None = None
        self.remote_hidden: Any = None  # rank 0: executor.run_hidden once attached

    @classmethod
    def from_full(
        cls,
        config: ModelConfig,
        weights: ModelWeights,
        ops: ModuleType,
        rank: int,
        world_size: int | None = None,
        parallel: ParallelConfig | None = None,
    ) -> ShardedLlamaModel:
        """Cut rank's part out of the full weights and build the model on it (world_size
        alone: tensor parallelism over one stage)."""
        parallel = parallel or ParallelConfig(tensor_parallel_size=world_size or 1)
        return cls(config, weights, ops, rank, parallel)

    def make_moe(self, weights: Any, row: int) -> Any:
        """An MoE layer's FFN on this rank: whole experts with an all-to-all (expert parallel)
        or a slice of every expert with an all-reduce (parallel/ep_moe.py)."""
        assert self.config.moe is not None
        return parallel_moe(
            weights, self.config.moe, self.ops, self.tp_rank,
            self.parallel.tensor_parallel_size, self.parallel.enable_expert_parallel,
            lambda: self.tp_group, self.expert_counts, row,
        )  # fmt: skip

    def _embed(self, batch: ForwardBatch) -> torch.Tensor:
        if self.is_first:
            return super()._embed(batch)
        if self.incoming is None or self.incoming.shape[0] != batch.num_tokens:
            raise RuntimeError("a later pipeline stage ran without the previous stage's output")
        x, self.incoming = self.incoming, None
        return x

    def _all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return y
        traffic.record("tp_all_reduce", y.numel() * y.element_size())
        dist.all_reduce(y, group=self.tp_group)  # sum of the ranks' partial products
        return y

    def _logits(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Last stage: (S, V) on the stage's TP rank 0, each other TP rank its own
        (S, ceil(V/N)) slice. Earlier stages: the (T, d) activations for the next one."""
        if not self.is_last:
            return x
        local = super()._logits(x, batch).contiguous()
        vocab = self.full_config.vocab_size
        if local.shape[0] == 0:  # every rank sees the same batch, so all skip the gather
            return local.new_empty((0, vocab))
        if self.world_size == 1:
            return local[:, :vocab]
        traffic.record("tp_gather", local.numel() * local.element_size())
        if self.rank != self.tp_leader:
            dist.gather(local, None, dst=self.tp_leader, group=self.tp_group)
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.gather(local, parts, dst=self.tp_leader, group=self.tp_group)
        return torch.cat(parts, dim=1)[:, :vocab]

    @torch.inference_mode()
    def hidden_states(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings (model/pooling.py) on rank 0: every rank must join the pass, so the
        executor sends it to the workers (executor.attach sets `remote_hidden`)."""
        if self.remote_hidden is None:
            raise NotImplementedError(
                "embeddings of a model split over processes run through its executor; this "
                "shard has none (only rank 0's model, attached to an engine, can embed)"
            )
        return self.remote_hidden(batch, k_caches, v_caches)

    @torch.inference_mode()
    def stage_hidden(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """This rank's part of an embeddings pass: its layers, then (last stage) the final
        norm: (T, d) on every rank."""
        x = self._layers(batch, k_caches, v_caches)
        if not self.is_last:
            return x
        return self.ops.rms_norm(x, self.final_norm, self.full_config.rms_norm_eps)
