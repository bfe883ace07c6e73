"""How layers share the paged KV pool: one group per attention kind (vLLM's hybrid allocator).

A model whose layers all see the whole context has one group: every layer reads the same block
table. Gemma 3 mixes sliding-window layers (which only ever read their last `window` keys) with
global layers (which read everything). Giving each kind its own block table lets the window
layers hand back the blocks that fell behind their window while the global layers keep theirs.

One pool serves every group, so a block must cost the same bytes whatever group takes it. As in
vLLM, the layers of each kind are cut into groups of `page_layers` layers (the gcd of the kinds'
layer counts), and a block id names one page: `block_size` slots in each of `page_layers` cache
arrays. The arrays are shared: the j-th layer of every group reads and writes array j, each
group through its own block ids. Gemma 3 270M: 3 global + 15 local layers -> page_layers 3,
six groups (1 global + 5 local), three K and three V arrays instead of eighteen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    group_windows: tuple[int, ...]  # window of each group's layers (0: the whole context)
    layer_group: tuple[int, ...]  # group of each layer
    layer_array: tuple[int, ...]  # which cache array each layer reads and writes
    page_layers: int  # cache arrays (layers per group)

    @property
    def num_groups(self) -> int:
        return len(self.group_windows)

    @property
    def num_layers(self) -> int:
        return len(self.layer_group)


def single_group(num_layers: int) -> KVLayout:
    """Every layer in one group on one block table (Llama, or windows not exploited)."""
    n = range(num_layers)
    return KVLayout((0,), tuple(0 for _ in n), tuple(n), num_layers)


def layout_for_windows(windows: list[int]) -> KVLayout:
    """Group layers by window (global layers first), `page_layers` = gcd of the kinds' counts."""
    if not windows:
        raise ValueError("a KV layout needs at least one layer")
    kinds = sorted(set(windows))  # 0 (global) sorts first
    if len(kinds) == 1:
        return single_group(len(windows))
    members = {w: [i for i, x in enumerate(windows) if x == w] for w in kinds}
    page = math.gcd(*(len(m) for m in members.values()))
    group_windows: list[int] = []
    layer_group = [0] * len(windows)
    layer_array = [0] * len(windows)
    for w in kinds:
        layers = members[w]
        for start in range(0, len(layers), page):
            for j, layer in enumerate(layers[start : start + page]):
                layer_group[layer], layer_array[layer] = len(group_windows), j
            group_windows.append(w)
    return KVLayout(tuple(group_windows), tuple(layer_group), tuple(layer_array), page)
