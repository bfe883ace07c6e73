"""Sequence: one token stream being generated, with its KV blocks and its progress.

A request with n > 1 starts as one sequence; after its prompt is computed it forks into n
sequences that share the prompt's KV blocks (see BlockManager.fork).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from minillm.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    index: int = 0  # which of the request's n completions
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def fork(self, index: int, generator: torch.Generator | None) -> Sequence:
        """A sibling with the same tokens so far (its blocks are shared by the block manager)."""
        return Sequence(
            self.request_id,
            list(self.token_ids),
            self.num_prompt_tokens,
            self.params,
            generator,
            index,
            status=self.status,
            num_cached_tokens=self.num_cached_tokens,
        )
