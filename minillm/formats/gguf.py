"""Read (and write) GGUF files with the `gguf` package: metadata as plain Python, tensors as blocks.

Tensors stay memory-mapped raw blocks (``QuantTensor``); nothing is dequantized here, because
the backend decides whether to compute on blocks (cpu, cuda) or on fp32 (ref).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor


class GGUFError(ValueError):
    """A GGUF file that cannot be read: missing, truncated, corrupt or of an unknown kind."""


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _open(path: str | os.PathLike[str]) -> Any:
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(p, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct.error on bad bytes
        size = p.stat().st_size
        raise GGUFError(
            f"{p} is truncated or corrupt ({size} bytes): the gguf reader failed with "
            f"{type(e).__name__}: {e}"
        ) from e


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, decoded to str/int/float/bool/list."""
    reader = _open(path)
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


class GGUFFile:
    """An open GGUF file: ``metadata`` (dict) and ``tensors`` (name -> QuantTensor, mmapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        reader = _open(self.path)
        self.metadata: dict[str, Any] = {
            name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")
        }
        self.tensors: dict[str, QuantTensor] = {}
        for t in reader.tensors:
            fmt = t.tensor_type.name
            if fmt not in BLOCK_LAYOUT:
                raise GGUFError(
                    f"{self.path}: tensor {t.name} uses format {fmt}, which minillm does not "
                    f"support (supported: {', '.join(BLOCK_LAYOUT)})"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne fastest-first
            raw = np.asarray(t.data)
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            data = raw.view(np.uint8).reshape(rows, -1)
            self.tensors[t.name] = QuantTensor(fmt, data, shape)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.architecture}, tensors={len(self.tensors)})"
