"""KV storage: one (num_blocks, block_size, KvH, D) array per layer for K and one for V.

With several KV groups (kv/layout.py: Gemma 3's window and global layers) the arrays are
shared: `layout.page_layers` arrays each for K and V, layer l using array layout.layer_array[l]
through its own group's block ids, so a block is one page of page_layers layers.

The engine sizes it from a memory budget, like vLLM's gpu_memory_utilization: whatever the
budget holds becomes blocks, and the block manager hands them out. The *backend* allocates the
arrays (``ops.allocate_kv_cache``) where its kernels read them: torch tensors in host memory for
``ref`` and ``cpu``, device arrays on the GPU for ``cuda``, so no step copies the cache around.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from minillm.kv.layout import KVLayout, single_group

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(size: str | int) -> int:
    """'256MiB' / '1.5GB' / 1048576 -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"memory size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {size!r}; use e.g. '256MiB', '2GB' or bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {size!r}")
    return value


def host_kv_cache(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed float32 cache array in host memory (what the ref and cpu backends use)."""
    return torch.zeros(shape, dtype=torch.float32)


def copy_host_kv_blocks(caches: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
    """Block src[i] -> block dst[i] in every cache array (host tensors)."""
    s, d = torch.tensor(src), torch.tensor(dst)
    for t in caches:
        t[d] = t[s]


def read_host_kv_slots(caches: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """The K/V of token slots `slots` from every cache array: (len(caches), n, KvH, D)."""
    return torch.stack([t.view(-1, *t.shape[2:])[slots] for t in caches])


def write_host_kv_slots(
    caches: list[torch.Tensor], slots: torch.Tensor, data: torch.Tensor
) -> None:
    """Write data[i] (n, KvH, D) into token slots `slots` of caches[i] (host tensors)."""
    for t, d in zip(caches, data, strict=True):
        t.view(-1, *t.shape[2:])[slots] = d


class KVCache:
    """K and V arrays for every layer. `ops`: the backend that allocates and copies them
    (None: host tensors, which every backend can read)."""

    ELEMENT_BYTES = 4  # float32

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        ops: Any = None,
        layout: KVLayout | None = None,
    ) -> None:
        self.layout = layout or single_group(num_layers)
        if self.layout.num_layers != num_layers:
            raise ValueError(
                f"KV layout for {self.layout.num_layers} layers, model has {num_layers}"
            )
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        allocate = getattr(ops, "allocate_kv_cache", host_kv_cache)
        self._copy = getattr(ops, "copy_kv_blocks", copy_host_kv_blocks)
        self._read = getattr(ops, "read_kv_slots", read_host_kv_slots)
        self._write = getattr(ops, "write_kv_slots", write_host_kv_slots)
        arrays = self.layout.page_layers
        k = [allocate(shape) for _ in range(arrays)]
        v = [allocate(shape) for _ in range(arrays)]
        self.k = [k[a] for a in self.layout.layer_array]  # one entry per layer, maybe shared
        self.v = [v[a] for a in self.layout.layer_array]
        self._arrays = k + v
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self._per_block = self.bytes_per_block(arrays, block_size, num_kv_heads, head_dim)

    @classmethod
    def bytes_per_block(
        cls, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * cls.ELEMENT_BYTES

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self._per_block

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate src blocks into dst blocks in every layer."""
        if pairs:
            self._copy(self._arrays, [s for s, _ in pairs], [d for _, d in pairs])

    def read_slots(self, slots: list[int]) -> torch.Tensor:
        """K and V of the given token slots in every layer, as a host float32 tensor
        (2, num_layers, len(slots), KvH, D): what a prefill server sends (engine/prefilled.py)."""
        self._one_group("read_slots")
        data = self._read(self.k + self.v, torch.tensor(slots, dtype=torch.long))
        return data.view(2, self.num_layers, *data.shape[1:])

    def write_slots(self, slots: list[int], data: torch.Tensor) -> None:
        """Write K/V shaped like read_slots' result into the given token slots (through the
        backend, so a device cache is written where its kernels read it)."""
        self._one_group("write_slots")
        flat = data.reshape(2 * self.num_layers, *data.shape[2:])
        self._write(self.k + self.v, torch.tensor(slots, dtype=torch.long), flat)

    def _one_group(self, what: str) -> None:
        """Slots name one block table: with several KV groups each group has its own."""
        if self.layout.num_groups > 1:
            raise ValueError(
                f"KVCache.{what}: a cache with {self.layout.num_groups} KV groups (sliding-window "
                "layers freeing blocks) has no single slot list; run the engine with "
                "free_out_of_window=False for prefill/decode disaggregation"
            )
