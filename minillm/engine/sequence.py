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
    # tables of KV groups 1.. (kv/hybrid_block_manager.py: Gemma 3's window layers); [] for Llama
    group_block_tables: list[list[int]] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None  # None: no context limit of its own
    first_scheduled_time: float | None = None  # time.perf_counter() when first scheduled

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

    def append_token(
        self, token_id: int, logprob: float, top_logprobs: dict[int, float] | None = None
    ) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.params.logprobs is not None:
            self.logprobs.append(top_logprobs or {token_id: logprob})

    def token_stop(self) -> SequenceStatus | None:
        """Whether the token just appended ends the sequence, judged on token ids alone.

        EOS and stop_token_ids count once min_tokens exist; then max_tokens, then the context
        limit. Stop *strings* need the text, so the output processor checks those.
        """
        p, tok, n_out = self.params, self.token_ids[-1], self.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                self.stop_reason = tok
                return SequenceStatus.FINISHED_STOPPED
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

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
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            first_scheduled_time=self.first_scheduled_time,
        )
