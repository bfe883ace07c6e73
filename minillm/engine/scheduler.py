"""The scheduler: each step, decide which sequences compute how many tokens; after it, keep
the books.

Continuous batching: running sequences continue (one decode token each, or the next chunk of
a long prompt), and waiting sequences are admitted into the same step whenever the token
budget, the sequence limit and the KV blocks allow. A sequence whose next token has no room
preempts the youngest running sequence, whose blocks are freed and whose tokens are computed
again later (preemption by recompute).

After the forward pass, ``update_from_output`` does all of the step's bookkeeping in one place
(as vLLM's scheduler does): computed-token counts, caching the blocks that became full, forking
a request with n > 1 at its first sample, appending the sampled tokens, and retiring the
sequences that a token ended (EOS, stop token, max_tokens, context full).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.kv.block_manager import BlockManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SampledToken:
    """The token the sampler chose for one sequence this step.

    fork_index > 0: the first token of the fork_index-th completion of an n > 1 request, drawn
    from its parent's logits row with its own generator; the scheduler creates that sibling.
    """

    seq: Sequence
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None
    fork_index: int = 0
    generator: torch.Generator | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config, self.block_manager = config, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. The engine validated its prompt (LLMEngine.check_prompt)."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire a sequence (finished or aborted) and give its blocks back."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)

    def _preempt(self, seq: Sequence, out: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # first in line to come back
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens

        # 1) running sequences, oldest first; make room by preempting the youngest
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate_slots(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running[-1], out)
            if not bm.can_allocate_slots(seq, n):
                self._preempt(seq, out)  # nothing younger left to evict: wait for memory
                break
            out.blocks_to_copy += bm.allocate_slots(seq, n)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
            i += 1

        # 2) admit waiting sequences (not in a step that had to preempt: memory is tight)
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = bm.find_cached_blocks(seq)
            n = seq.num_tokens - len(cached) * bm.block_size
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not bm.can_allocate(seq, cached, n):
                break
            bm.allocate(seq, cached, n)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def admit_computed(self, seq: Sequence) -> bool:
        """Admit a sequence whose prompt K/V were computed elsewhere (a prefill server): take
        blocks for the whole prompt now, prefix hits reused, and run it from its next token.

        The caller writes the K/V from `seq.num_computed_tokens` (the prefix hits) onwards and
        then marks the prompt computed. False: no room yet (or preempted sequences wait first);
        nothing was taken."""
        bm = self.block_manager
        if self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        cached = bm.find_cached_blocks(seq)
        n = seq.num_tokens - len(cached) * bm.block_size
        if not bm.can_allocate(seq, cached, n):
            return False
        bm.allocate(seq, cached, n)
        seq.first_scheduled_time = time.perf_counter()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    # ------------------------------------------------------------------ after the step
    def update_from_output(
        self, batch: ScheduledBatch, sampled: list[SampledToken]
    ) -> list[Sequence]:
        """Book one step's results; returns the sequences that got a token, in sampled order."""
        bm = self.block_manager
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
        # siblings first: each copies its parent's tokens before the parent appends its own
        seqs = [
            self._fork(s.seq, s.fork_index, s.generator) if s.fork_index else s.seq for s in sampled
        ]
        for seq, s in zip(seqs, sampled, strict=True):
            seq.append_token(s.token_id, s.logprob, s.top_logprobs)
            status = seq.token_stop()
            if status is not None:
                self.finish(seq, status)
        return seqs

    def _fork(self, parent: Sequence, index: int, generator: torch.Generator | None) -> Sequence:
        """The index-th completion of parent's request: it shares all of parent's KV blocks."""
        child = parent.fork(index, generator)
        self.block_manager.fork(parent, child)
        at = self.running.index(parent) + 1
        while at < len(self.running) and self.running[at].request_id == parent.request_id:
            at += 1  # after the siblings forked before it, in index order
        self.running.insert(at, child)
        return child
