"""Read GGUF files: metadata as plain Python, tensors as memory-mapped raw blocks.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x (key str, value type u32, value)          str = u64 length + utf-8 bytes
    n_tensors x (name str, n_dims u32, dims u64[n_dims] fastest-first, ggml type u32, offset u64)
    padding to `general.alignment` (32) | tensor data, each at data_start + offset

Why not `gguf.GGUFReader`: it builds a numpy view for every item of every metadata array, which
takes 5-15 s on a 49k-token vocabulary; a struct walk reads the same header in ~0.2 s. The
`gguf` package stays the reference: tests check that both readers agree field for field, and
it is what writes GGUF files (see compress/). Nothing is dequantized here: the backend decides
whether to compute on blocks (cpu, cuda) or on fp32 (ref).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor

# GGUF value type id -> (struct format, numpy dtype) of the fixed-size scalars
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
# ggml type ids of the formats we can hold (ggml.h `enum ggml_type`)
_GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    8: "Q8_0",
    12: "Q4_K",
    14: "Q6_K",
    30: "BF16",
}
# ggml I8: plain int8 tensors, kept apart in GGUFFile.int8_tensors (minillm writes per-channel
# int8 weights this way, with an F32 "<name>.scale" beside each; see formats/int8_rows.py)
_GGML_I8 = "TYPE_24"


class GGUFError(ValueError):
    """A GGUF file that cannot be read: missing, truncated, corrupt or of an unknown kind."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type, e.g. "Q4_1", "F32" (TYPE_<id> for types minillm cannot hold)
    shape: tuple[int, ...]  # numpy order: slowest first
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"a string of {n} bytes runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n]
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
                if self.pos + dtype.itemsize * count > len(self.buf):
                    raise GGUFError(f"an array of {count} items runs past the end of the file")
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    return p


def _parse_header(buf: mmap.mmap, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, 4)
    try:
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            tensors.append(
                TensorInfo(
                    name,
                    _GGML_TYPES.get(type_id, f"TYPE_{type_id}"),
                    tuple(int(d) for d in reversed(dims)),
                    offset,
                )
            )
    except (struct.error, OverflowError, GGUFError) as e:
        raise GGUFError(
            f"{path} is truncated or corrupt ({len(buf)} bytes): the header could not be read ({e})"
        ) from e
    align = int(metadata.get("general.alignment", 32))
    return GGUFHeader(version, metadata, tensors, -(-cur.pos // align) * align)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Metadata and tensor directory only; tensor data is never touched."""
    p = _check_path(path)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse_header(buf, p)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, decoded to str/int/float/bool/list."""
    return read_header(path).metadata


class GGUFFile:
    """An open GGUF file: ``metadata`` (dict) and ``tensors`` (name -> QuantTensor, mmapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _check_path(path)
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header = _parse_header(self._mmap, self.path)
        self.version, self.metadata = header.version, header.metadata
        self.tensors: dict[str, QuantTensor] = {}
        self.int8_tensors: dict[str, np.ndarray] = {}
        size = len(self._mmap)
        for t in header.tensors:
            if t.type_name == _GGML_I8:
                start = header.data_start + t.offset
                if start + t.n_elements > size:
                    raise GGUFError(f"{self.path} is truncated: tensor {t.name} runs past the end")
                data = np.frombuffer(self._mmap, np.int8, t.n_elements, start)
                self.int8_tensors[t.name] = data.reshape(t.shape)
                continue
            if t.type_name not in BLOCK_LAYOUT:
                raise GGUFError(
                    f"{self.path}: tensor {t.name} uses ggml type {t.type_name}, which minillm "
                    f"does not support (supported: {', '.join(BLOCK_LAYOUT)})"
                )
            elems, nbytes = BLOCK_LAYOUT[t.type_name]
            rows = math.prod(t.shape[:-1])
            row_bytes = t.shape[-1] // elems * nbytes
            start = header.data_start + t.offset
            if start + rows * row_bytes > size:
                raise GGUFError(
                    f"{self.path} is truncated: tensor {t.name} needs bytes up to "
                    f"{start + rows * row_bytes}, the file has {size}"
                )
            data = np.frombuffer(self._mmap, np.uint8, rows * row_bytes, start)
            self.tensors[t.name] = QuantTensor(t.type_name, data.reshape(rows, row_bytes), t.shape)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, arch={self.architecture}, tensors={len(self.tensors)})"
        )
