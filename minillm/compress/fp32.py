"""Weights as fp32 torch tensors and back: the compression methods compute in fp32 torch."""

from __future__ import annotations

import numpy as np
import torch

from minillm.formats.blocks import QuantTensor, quantize


def as_torch(q: QuantTensor) -> torch.Tensor:
    """A stored weight (any block format) dequantized to an fp32 tensor of its shape."""
    return torch.from_numpy(np.array(q.dequantize(), dtype=np.float32))


def as_fp32(values: torch.Tensor | np.ndarray) -> QuantTensor:
    """An fp32 array or tensor stored as an F32 QuantTensor (what the model loads)."""
    arr = values.numpy() if isinstance(values, torch.Tensor) else values
    return quantize(np.ascontiguousarray(arr, dtype=np.float32), "F32")
