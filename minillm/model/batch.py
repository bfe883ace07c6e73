"""ForwardBatch: everything one forward pass needs, flattened across sequences.

The runner puts decode sequences (one new token each) first, then prefill chunks, so decode
attention is one batched paged call and each prefill chunk is one causal call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flattened batch
    length: int  # new tokens computed now
    context_len: (
        int  # tokens in the cache once these are stored (cached prefix + earlier chunks + new)
    )
    block_table: torch.Tensor  # (num_blocks,) int64


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: where each token's K/V goes in the paged cache
    num_decode: int  # rows [0, num_decode) are decode tokens
    decode_block_tables: torch.Tensor  # (num_decode, max_blocks) int64, padded
    decode_context_lens: torch.Tensor  # (num_decode,) int64
    prefills: list[PrefillChunk]
    logits_rows: torch.Tensor  # (S,) rows whose next-token logits are needed
    # KV groups (kv/layout.py): group g's view of this batch (its slots and block tables) for
    # g >= 1, and each layer's group; empty when every layer shares one block table
    group_batches: list[ForwardBatch] = field(default_factory=list)
    layer_group: tuple[int, ...] = ()

    def for_layer(self, layer: int) -> ForwardBatch:
        """The batch as `layer` must see it: its own group's slots and block tables."""
        g = self.layer_group[layer] if self.layer_group else 0
        return self if g == 0 else self.group_batches[g - 1]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])
