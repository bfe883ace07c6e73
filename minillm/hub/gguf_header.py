"""A fast read of a GGUF header (metadata + tensor directory) for `show` and `list`.

``gguf.GGUFReader`` builds a numpy view for every item of every array, which takes seconds on a
49k-token vocabulary; `minillm show` only needs the header, which a struct walk reads in
milliseconds. Tensor data is never touched. Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key str, type u32, value)        str = u64 length + utf-8 bytes
    n_tensors x (name str, n_dims u32, dims u64[n_dims] fastest-first, type u32, offset u64)
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value type id -> (struct format, numpy dtype) for the fixed-size scalars
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "?"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # GGML type, e.g. "Q4_1", "F32"
    shape: tuple[int, ...]  # numpy order (slowest first), as minillm.formats.gguf reports it

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:  # one numpy read instead of `count` struct calls
                dtype = np.dtype(_SCALARS[item_type][1])
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"TYPE_{type_id}"


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata (decoded like ``minillm.formats.gguf.read_metadata``) and the tensor directory."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (magic bytes {buf[:4]!r})")
        cur = _Cursor(buf)
        cur.pos = 4
        try:
            version = cur.scalar("<I")
            if version < 2:
                raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
            n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.scalar("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
                type_id = cur.scalar("<I")
                cur.scalar("<Q")  # data offset: not needed for a summary
                tensors.append(TensorInfo(name, _type_name(type_id), tuple(reversed(dims))))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e
    return GGUFHeader(version, metadata, tensors)
