"""ModelRunner: turn the scheduler's decision into one flattened ForwardBatch and run it."""

from __future__ import annotations

import torch

from minillm.engine.scheduler import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.kv.cache import KVCache
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size

    def build_batch(self, sched: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
        """Decode rows first, then prefill chunks; returns the batch and the sequences to sample
        (those whose every known token will be computed after this step)."""
        bs = self.block_size
        order = sorted(range(len(sched)), key=lambda i: sched.num_new_tokens[i] != 1)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logits_rows: list[int] = []
        to_sample: list[Sequence] = []
        for i in order:
            seq, n = sched.seqs[i], sched.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row = len(token_ids)
            token_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row, n, end, torch.tensor(seq.block_table)))
            if end == seq.num_tokens:
                logits_rows.append(row + n - 1)
                to_sample.append(seq)
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]  # block 0: masked out
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decode=len(decode_tables),
            decode_block_tables=torch.tensor(padded, dtype=torch.long).reshape(len(padded), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
            prefills=prefills,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        )
        return batch, to_sample

    def execute(self, sched: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        self.kv_cache.copy_blocks(sched.blocks_to_copy)
        batch, to_sample = self.build_batch(sched)
        logits = self.model.forward(batch, self.kv_cache.k, self.kv_cache.v)
        return logits, to_sample
