"""Per-channel int8 weights in GGUF: an I8 tensor plus an F32 ``<name>.scale`` row scale.

W8A16 per-channel quantization keeps one scale per output row (``w ~ scale[row] * q``, q int8).
GGUF has no block type for that (Q8_0 keeps one fp16 scale per 32 weights), so minillm stores
the integers as a plain ggml ``I8`` tensor under the weight's own name and the scales as an
``F32`` tensor named ``<name>.scale``. llama.cpp and transformers do not know this convention;
minillm's loader folds the pair back into one weight.

Loading dequantizes to fp32 (``scale * q``): the ref backend computes in fp32 anyway, and no
backend has an int8-per-row kernel yet, so the file is 4x smaller than fp32 but memory at run
time is not. Embeddings and the output head are never stored this way (they stay in a block
format), so a file's tensor names still say whether the head is tied.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minillm.formats.blocks import QuantTensor

SCALE_SUFFIX = ".scale"


def int8_row_tensors(name: str, q: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """The two GGUF tensors that store int8 weight `q` (rows, cols) and its row `scale`."""
    if q.dtype != np.int8 or q.ndim != 2:
        raise TypeError(f"{name}: int8 weights must be a 2-D int8 array, got {q.dtype} {q.shape}")
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if scale.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: {q.shape[0]} rows but {scale.shape[0]} row scales")
    return {name: np.ascontiguousarray(q), name + SCALE_SUFFIX: scale}


def fold_int8_rows(
    tensors: Mapping[str, QuantTensor], int8_tensors: Mapping[str, np.ndarray]
) -> dict[str, QuantTensor]:
    """Replace each I8 weight and its ``.scale`` by one fp32 QuantTensor (scale * q)."""
    out = dict(tensors)
    for name, q in int8_tensors.items():
        scale_name = name + SCALE_SUFFIX
        if scale_name not in out:
            raise ValueError(f"int8 tensor {name!r} has no {scale_name!r} row-scale tensor")
        scale = out.pop(scale_name).dequantize().reshape(-1)
        if q.ndim != 2 or scale.shape[0] != q.shape[0]:
            raise ValueError(
                f"int8 tensor {name!r} of shape {q.shape} does not match its {scale.shape[0]} scales"
            )
        values = q.astype(np.float32) * scale[:, None]
        out[name] = QuantTensor.from_array(values, "F32")
    return out
