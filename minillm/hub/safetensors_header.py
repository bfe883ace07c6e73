"""Tensor names, dtypes and shapes of a .safetensors file, read from its JSON header only.

Layout: u64 little-endian header length N, then N bytes of JSON
``{"name": {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}, "__metadata__": {...}}``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class SafetensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: str | Path) -> list[SafetensorInfo]:
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is too short to be a .safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(
                f"{path}: safetensors header of {n} bytes is implausible (corrupt file?)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    return [
        SafetensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        for name, entry in header.items()
        if name != "__metadata__"
    ]
