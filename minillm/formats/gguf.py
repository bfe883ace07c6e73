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

Nothing in a header is trusted: counts and lengths are checked against the bytes left
(formats/gguf_cursor.py), and the tensor directory against the file (formats/gguf_layout.py),
so a corrupt file fails with one GGUFError that names the file and the field. Whether the
metadata describes a model minillm can run is formats/gguf_check.py's business.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor
from minillm.formats.gguf_cursor import ARRAY, INTEGER_TYPES, STRING, Cursor, GGUFError
from minillm.formats.gguf_layout import TensorInfo, check_extents, check_n_dims, tensor_info

__all__ = ["GGUFError", "GGUFFile", "GGUFHeader", "TensorInfo", "read_header", "read_metadata"]

# ggml I8: plain int8 tensors, kept apart in GGUFFile.int8_tensors (minillm writes per-channel
# int8 weights this way, with an F32 "<name>.scale" beside each; see formats/int8_rows.py)
_GGML_I8 = "I8"
_DEFAULT_ALIGNMENT = 32
# The fewest bytes one metadata entry (key length, value type, a 1-byte value) and one tensor
# entry (name length, n_dims, one dim, type, offset) can take: bounds the header's counts.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    # key -> (GGUF value type, item type for arrays else None): what the file stores it as
    value_types: dict[str, tuple[int, int | None]]


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise GGUFError(f"{p} is a folder, not a GGUF file")
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"{p} cannot be read: {e.strerror}") from None
    if magic != b"GGUF":
        raise GGUFError(f"{p} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    return p


def _alignment(metadata: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> int:
    """general.alignment: data offsets are multiples of it, so it must be a power of two."""
    if "general.alignment" not in metadata:
        return _DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if types["general.alignment"][0] not in INTEGER_TYPES or value < 1 or value & (value - 1):
        raise GGUFError(f"must be a positive power of two, got {value!r:.40}")
    return value


def _check_architecture(metadata: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> None:
    """The GGUF spec requires general.architecture: every other model key is named after it."""
    if "general.architecture" not in metadata:
        raise GGUFError("is missing (the GGUF spec requires it)")
    arch = metadata["general.architecture"]
    if types["general.architecture"][0] != STRING or not arch:
        raise GGUFError(f"must be a non-empty string, got {arch!r:.40}")


def _parse_header(buf: mmap.mmap, path: Path) -> GGUFHeader:
    """Walk the header, checking every count, length and value before it is used."""
    cur = Cursor(buf, 4)
    field = "the header"  # what is being read, for the error message
    try:
        version = cur.u32()
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        room = cur.size - cur.pos
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > room:
            raise GGUFError(
                f"it declares {n_tensors} tensors and {n_kv} metadata keys, more than the "
                f"{room} bytes after it can hold: the file is truncated or corrupt"
            )
        metadata: dict[str, Any] = {}
        types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            field = f"metadata key #{i}"
            key = cur.string()
            field = f"metadata {key!r:.80}"
            if key in metadata:
                raise GGUFError("appears twice")
            vtype = cur.u32()
            item_type = cur.peek_u32() if vtype == ARRAY else None
            metadata[key] = cur.value(vtype)
            types[key] = (vtype, item_type)
        field = "metadata 'general.alignment'"
        alignment = _alignment(metadata, types)
        field = "metadata 'general.architecture'"
        _check_architecture(metadata, types)
        tensors = []
        for i in range(n_tensors):
            field = f"tensor #{i}"
            name = cur.string()
            field = f"tensor {name!r:.80}"
            n_dims = cur.u32()
            check_n_dims(n_dims)
            dims = [cur.u64() for _ in range(n_dims)]
            type_id, offset = cur.u32(), cur.u64()
            tensors.append(tensor_info(name, dims, type_id, offset, alignment))
    except struct.error:
        raise GGUFError(
            f"{path}: {field}: the file ends at byte {len(buf)}; it is truncated or corrupt"
        ) from None
    except GGUFError as e:
        sep = " " if field.startswith("tensor '") else ": "  # "tensor 'x' has ..."
        raise GGUFError(f"{path}: {field}{sep}{e}") from None
    data_start = -(-cur.pos // alignment) * alignment
    try:
        check_extents(tensors, data_start, len(buf))
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    return GGUFHeader(version, metadata, tensors, data_start, types)


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
        try:  # every check comes before the first view into the mmap, so it can still close
            header = _parse_header(self._mmap, self.path)
            for t in header.tensors:
                if t.type_name != _GGML_I8 and t.type_name not in BLOCK_LAYOUT:
                    raise GGUFError(
                        f"{self.path}: tensor {t.name!r} uses ggml type {t.type_name}, which "
                        f"minillm does not support (supported: {', '.join(BLOCK_LAYOUT)})"
                    )
        except GGUFError:
            self._mmap.close()
            raise
        self.version, self.metadata = header.version, header.metadata
        self.tensor_infos: list[TensorInfo] = header.tensors
        self.tensors: dict[str, QuantTensor] = {}
        self.int8_tensors: dict[str, np.ndarray] = {}
        for t in header.tensors:  # extents were checked: each lies inside the file
            start = header.data_start + t.offset
            if t.type_name == _GGML_I8:
                data = np.frombuffer(self._mmap, np.int8, t.n_elements, start)
                self.int8_tensors[t.name] = data.reshape(t.shape)
                continue
            rows = t.n_elements // t.shape[-1]
            data = np.frombuffer(self._mmap, np.uint8, t.nbytes, start)
            self.tensors[t.name] = QuantTensor(t.type_name, data.reshape(rows, -1), t.shape)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, arch={self.architecture}, tensors={len(self.tensors)})"
        )
