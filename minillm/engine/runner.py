"""ModelRunner: turn the scheduler's decision into one flattened ForwardBatch and run it."""

from __future__ import annotations

import dataclasses

import torch

from minillm.engine.scheduler import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.kv.cache import KVCache
from minillm.kv.hybrid_block_manager import NULL_BLOCK
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel


def _table(seq: Sequence, group: int) -> list[int]:
    """The group's block table as the kernels get it: a window group's released entries
    (NULL_BLOCK) become block 0, like vLLM's null block: a valid id the windowed kernels never
    read (they start at the window's first block; ref gathers it and masks it out)."""
    if group == 0 and not seq.group_block_tables:
        return seq.block_table
    table = seq.block_table if group == 0 else seq.group_block_tables[group - 1]
    return [0 if b == NULL_BLOCK else b for b in table]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size
        self.layout = kv_cache.layout

    def _tables(
        self, sched: ScheduledBatch, order: list[int], group: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Group `group`'s slot mapping, padded decode tables and prefill tables."""
        bs = self.block_size
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        prefill_tables: list[torch.Tensor] = []
        for i in order:
            seq, n = sched.seqs[i], sched.num_new_tokens[i]
            table = _table(seq, group)
            start = seq.num_computed_tokens
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(table)
            else:
                prefill_tables.append(torch.tensor(table))
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]  # block 0: masked out
        return (
            torch.tensor(slots, dtype=torch.long),
            torch.tensor(padded, dtype=torch.long).reshape(len(padded), width),
            prefill_tables,
        )

    def build_batch(self, sched: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
        """Decode rows first, then prefill chunks; returns the batch and the sequences to sample
        (those whose every known token will be computed after this step)."""
        order = sorted(range(len(sched)), key=lambda i: sched.num_new_tokens[i] != 1)
        token_ids: list[int] = []
        positions: list[int] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logits_rows: list[int] = []
        to_sample: list[Sequence] = []
        slots, decode_tables, prefill_tables = self._tables(sched, order, 0)
        for i in order:
            seq, n = sched.seqs[i], sched.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row = len(token_ids)
            token_ids += seq.token_ids[start:end]
            positions += range(start, end)
            if n == 1:
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row, n, end, prefill_tables[len(prefills)]))
            if end == seq.num_tokens:
                logits_rows.append(row + n - 1)
                to_sample.append(seq)
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=slots,
            num_decode=len(decode_lens),
            decode_block_tables=decode_tables,
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
            prefills=prefills,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        )
        if self.layout.num_groups > 1:
            batch.layer_group = self.layout.layer_group
            for g in range(1, self.layout.num_groups):
                g_slots, g_decode, g_prefill = self._tables(sched, order, g)
                chunks = [
                    dataclasses.replace(p, block_table=t)
                    for p, t in zip(prefills, g_prefill, strict=True)
                ]
                batch.group_batches.append(
                    dataclasses.replace(
                        batch,
                        slot_mapping=g_slots,
                        decode_block_tables=g_decode,
                        prefills=chunks,
                        group_batches=[],
                        layer_group=(),
                    )
                )
        return batch, to_sample

    def execute(self, sched: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        self.kv_cache.copy_blocks(sched.blocks_to_copy)
        batch, to_sample = self.build_batch(sched)
        logits = self.model.forward(batch, self.kv_cache.k, self.kv_cache.v)
        return logits, to_sample
