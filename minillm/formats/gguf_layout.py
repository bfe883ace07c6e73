"""Where each tensor's bytes lie in a GGUF file, checked before any of them is touched.

The tensor directory gives each tensor a shape, a ggml type and an offset; together they say
which bytes it owns. A corrupt directory can claim a zero or astronomically large shape, an
unknown type, an offset off the alignment, bytes past the end of the file, or bytes another
tensor owns. All of it is refused here by arithmetic on the directory alone, so `minillm show`
(which never reads tensor data) rejects the same files that loading them would.

Block sizes come from the `gguf` package (llama.cpp's own table), so every ggml type can be
measured, including the ones minillm cannot compute with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from minillm.formats.gguf_cursor import GGUFError

MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = 2**63 - 1  # ggml counts elements and bytes in int64_t

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type, e.g. "Q4_1", "F32", "I8"
    shape: tuple[int, ...]  # numpy order: slowest first
    offset: int  # from the start of the data section
    nbytes: int  # of its data in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def check_n_dims(n_dims: int) -> None:
    """Checked before the dims are read, so a corrupt count never drives a long loop."""
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"has {n_dims} dimensions (a GGUF tensor has 1 to {MAX_DIMS})")


def tensor_info(
    name: str, dims: list[int], type_id: int, offset: int, alignment: int
) -> TensorInfo:
    """One directory entry (`dims` fastest first, as stored), after checking it is possible.

    Reasons read after the tensor's name: "tensor 'x' has a zero-sized dimension ...".
    """
    if type_id not in GGML_TYPES:
        raise GGUFError(f"has unknown ggml type id {type_id}")
    type_name, block_elems, block_bytes = GGML_TYPES[type_id]
    n = 1
    for d in dims:
        if d < 1:
            raise GGUFError(f"has a zero-sized dimension (shape {tuple(reversed(dims))})")
        n *= d
        if n > _INT64_MAX:
            raise GGUFError(f"shape {tuple(reversed(dims))} has more elements than fit in int64")
    if dims[0] % block_elems:
        raise GGUFError(
            f"row length {dims[0]} is not a multiple of the {type_name} block size {block_elems}"
        )
    if offset % alignment:
        raise GGUFError(f"offset {offset} is not a multiple of the alignment {alignment}")
    return TensorInfo(
        name, type_name, tuple(reversed(dims)), offset, n // block_elems * block_bytes
    )


def check_extents(tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    """Every tensor's bytes inside the file, and no two tensors sharing a byte or a name."""
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise GGUFError(f"tensor {t.name!r} appears twice in the tensor directory")
        names.add(t.name)
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for before, after in zip(by_offset, by_offset[1:], strict=False):
        if before.offset + before.nbytes > after.offset:
            raise GGUFError(
                f"tensor {before.name!r} (data bytes {before.offset}..{before.offset + before.nbytes}"
                f") overlaps tensor {after.name!r} (from byte {after.offset})"
            )
    if by_offset:
        last = by_offset[-1]
        end = data_start + last.offset + last.nbytes
        if end > file_size:
            raise GGUFError(
                f"the file is truncated: tensor {last.name!r} needs bytes up to {end}, the file "
                f"has {file_size}"
            )
