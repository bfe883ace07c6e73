"""Save a compressed model as a GGUF file that keeps its source's tokenizer and chat template."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from minillm.compress.int_quant import quantize_int8_per_channel
from minillm.compress.quantize import QuantizedModel
from minillm.config import ModelConfig
from minillm.formats.gguf_write import (
    GGUFValueType,
    TypedValue,
    gguf_tensors,
    metadata_for_hf_model,
    model_metadata,
    read_typed_metadata,
    write_gguf,
)
from minillm.formats.int8_rows import int8_row_tensors


def source_metadata(path: str | os.PathLike[str], config: ModelConfig, tokenizer) -> dict:  # noqa: ANN001
    """The metadata to copy: a GGUF's own (typed), or one rebuilt from an HF folder."""
    p = Path(path)
    if p.is_file():
        return read_typed_metadata(p)
    return metadata_for_hf_model(config, tokenizer)


def save_quantized_gguf(
    qm: QuantizedModel, path: str | os.PathLike[str], source: dict[str, TypedValue]
) -> Path:
    """Write `qm` to `path`: block formats as they are, int8 rows as I8 + F32 ".scale"."""
    if not qm.storable:
        raise ValueError(f"method {qm.method!r} is an in-memory experiment with no GGUF layout")
    tensors: dict[str, object] = {}
    for name, t in gguf_tensors(qm.config, qm.weights).items():
        if name not in qm.int8_names:
            tensors[name] = t
            continue
        q, scale = quantize_int8_per_channel(torch.from_numpy(np.array(t.dequantize())))
        tensors.update(int8_row_tensors(name, q.numpy(), scale.numpy()))
    extra = {"minillm.quantization": TypedValue(qm.method, GGUFValueType.STRING)}
    metadata = model_metadata(qm.config, source, qm.file_type, extra)
    return write_gguf(path, qm.config.arch, tensors, metadata)  # type: ignore[arg-type]
