"""The scheduler: each step, decide which sequences compute how many tokens.

Continuous batching: running sequences continue (one decode token each, or the next chunk of
a long prompt), and waiting sequences are admitted into the same step whenever the token
budget, the sequence limit and the KV blocks allow. A sequence whose next token has no room
preempts the youngest running sequence, whose blocks are freed and whose tokens are computed
again later (preemption by recompute).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config, self.block_manager = config, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens, more than max_model_len="
                f"{self.config.max_model_len}"
            )
        if self.block_manager.blocks_for(seq.num_tokens + 1) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens cannot fit in the KV cache "
                f"({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size})"
            )
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
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out
