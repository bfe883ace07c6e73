"""A bounds-checked walk over GGUF's typed binary values (shared by the reader and the writer).

Every length and count in a GGUF header comes from the file, so each is checked against the
bytes that are left *before* anything is allocated or read: a corrupt or hostile file fails
with a GGUFError in microseconds instead of asking for gigabytes, and nested arrays are cut off
at a small depth instead of recursing until Python's stack gives out.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np

# GGUF value type id -> (struct format, numpy dtype) of the fixed-size scalars
SCALAR_TYPES: dict[int, tuple[str, str]] = {
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
INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
STRING, ARRAY = 8, 9
# llama.cpp rejects arrays of arrays outright; gguf-py reads them. A few levels is generous.
MAX_ARRAY_DEPTH = 4

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in SCALAR_TYPES.items()}
_ITEM_BYTES = {t: s.size for t, s in _STRUCTS.items()} | {STRING: 8, ARRAY: 12}


class GGUFError(ValueError):
    """A GGUF file that cannot be read: missing, truncated, corrupt or of an unknown kind."""


class Cursor:
    """Reads typed values from `buf` at `pos`; every read is checked against the buffer's end.

    A read past the end raises ``struct.error`` (a truncated file); callers turn it into a
    GGUFError that names the field being read.
    """

    def __init__(self, buf: mmap.mmap | bytes, pos: int) -> None:
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def u32(self) -> int:
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def peek_u32(self) -> int:
        """The next u32 without moving (an array's item type, before reading the array)."""
        return _U32.unpack_from(self.buf, self.pos)[0]

    def string(self) -> str:
        n = self.u64()
        if n > self.size - self.pos:
            raise GGUFError(
                f"a string of {n} bytes at byte {self.pos - 8} runs past the end of the file "
                f"({self.size} bytes): it is truncated or corrupt"
            )
        raw = self.buf[self.pos : self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"the string at byte {self.pos - 8} is not valid UTF-8 ({e})") from None
        self.pos += n
        return text

    def value(self, vtype: int, depth: int = 0) -> Any:
        """One value of GGUF type `vtype`, as str/int/float/bool or a list of them."""
        if vtype in _STRUCTS:
            (value,) = _STRUCTS[vtype].unpack_from(self.buf, self.pos)
            self.pos += _STRUCTS[vtype].size
            return value
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            return self._array(depth)
        raise GGUFError(f"unknown GGUF value type {vtype} at byte {self.pos - 4}")

    def _array(self, depth: int) -> list[Any]:
        start = self.pos
        item_type, count = self.u32(), self.u64()
        if item_type not in _ITEM_BYTES:
            raise GGUFError(f"an array at byte {start} has unknown item type {item_type}")
        if item_type == ARRAY and depth + 1 >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {start}")
        if count * _ITEM_BYTES[item_type] > self.size - self.pos:
            raise GGUFError(
                f"an array of {count} items at byte {start} cannot fit in the "
                f"{self.size - self.pos} bytes left in the file: it is truncated or corrupt"
            )
        if item_type in SCALAR_TYPES:  # one numpy read instead of `count` struct calls
            dtype = np.dtype(SCALAR_TYPES[item_type][1])
            items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += dtype.itemsize * count
            return items.tolist()
        return [self.value(item_type, depth + 1) for _ in range(count)]
