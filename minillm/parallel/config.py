"""ParallelConfig: how one model is split over processes; what every worker receives.

One small frozen dataclass travels from `LLM(...)` / `minillm serve` to every rank, so a new
kind of parallelism adds one field here (with a default) instead of one more argument on every
function between the caller and the worker loop.

Ranks are laid out pipeline-major: rank = pp_rank * tensor_parallel_size + tp_rank, so the
ranks of one pipeline stage are contiguous (with one host per stage under torchrun, TP's
frequent all-reduces stay inside a host and only the stage boundary crosses hosts).
"""

from __future__ import annotations

from dataclasses import dataclass


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelConfig:
    """tensor_parallel_size x pipeline_parallel_size processes run one model.

    num_micro_batches: how many micro-batches a pipeline step's batch is split into (fewer
    when the step has fewer sequences); None: one per stage, the smallest number that lets
    every stage work at once. enable_expert_parallel: split MoE experts over the TP ranks
    instead of sharding each expert (the expert-parallel part reads it). activations: what
    the cpu backend's matmuls do with x on every rank ("int8" | "fp32"; None: the default).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    num_micro_batches: int | None = None
    enable_expert_parallel: bool = False
    activations: str | None = None

    def __post_init__(self) -> None:
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.num_micro_batches is not None:
            _positive_int("num_micro_batches", self.num_micro_batches)
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(
                f"enable_expert_parallel must be a bool, got {self.enable_expert_parallel!r}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def micro_batches(self) -> int:
        """The number of micro-batches a full step is split into."""
        return self.num_micro_batches or self.pipeline_parallel_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tensor_parallel_size + tp_rank
