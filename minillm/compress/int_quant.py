"""Quantize one weight matrix: int8 per channel and int4 per group (gpt-fast style).

- **W8A16 int8 per channel**: one scale per output row, symmetric:
  ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in -127..127, ``w ~ scale * q``.
- **W4A16 int4 per group**: every `group_size` consecutive weights of a row get their own
  scale and offset (asymmetric: the group's min maps to 0 and its max to 15):
  ``scale = (max - min) / 15``, ``q = round((w - min) / scale)`` in 0..15, ``w ~ scale * q + min``.
  With group 32 this is exactly GGUF's Q4_1 layout (fp16 scale and min per 32 weights).

These tensor-level schemes sit below both users of them: ``quantize.py`` (whole models, the
method table) and ``awq.py`` (which searches scales by measuring the int4 error), so imports
flow one way: quantize -> awq -> int_quant. ``quantize`` re-exports them for the lessons.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- int8 per channel


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: (q int8 (out, in), scale float32 (out,)).

    A row of zeros gets scale 1 (any scale reproduces it).
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# --------------------------------------------------------------------------- int4 per group


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int = 32, asymmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit integers per group of `group_size` weights along each row.

    Returns (q uint8 (out, in), scale (out, in/group), offset (out, in/group)), with
    ``w ~ q * scale + offset``. Asymmetric: q in 0..15, offset = the group's min. Symmetric:
    zero stays exactly zero: q - 8 in -7..7 with scale = max|w| / 7, i.e. offset = -8 * scale,
    so both share one dequantization formula.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"row length {cols} is not a multiple of group_size={group_size}")
    g = w.float().reshape(rows, cols // group_size, group_size)
    if asymmetric:
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        offset = lo
    else:
        absmax = g.abs().amax(dim=-1)
        scale = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax))
        offset = -8 * scale
    q = torch.round((g - offset[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(rows, cols), scale, offset


def dequantize_int4_groupwise(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int = 32
) -> torch.Tensor:
    rows, cols = q.shape
    g = q.float().reshape(rows, cols // group_size, group_size)
    return (g * scale[..., None] + offset[..., None]).reshape(rows, cols)


def fake_quantize_int4(
    w: torch.Tensor, group_size: int = 32, asymmetric: bool = True
) -> torch.Tensor:
    """Quantize then dequantize: the float weights an int4 model actually computes with.

    A row whose length is not a multiple of `group_size` ends in one shorter group (e.g. 576 =
    4 x 128 + 64), as AWQ-style group-128 schemes do for odd widths.
    """
    cols = w.shape[-1]
    full = cols - cols % group_size
    parts = [w[:, :full], w[:, full:]] if full not in (0, cols) else [w]
    out = []
    for part in parts:
        g = group_size if part.shape[1] % group_size == 0 else part.shape[1]
        out.append(dequantize_int4_groupwise(*quantize_int4_groupwise(part, g, asymmetric), g))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def fake_quantize_int8(w: torch.Tensor) -> torch.Tensor:
    return dequantize_int8_per_channel(*quantize_int8_per_channel(w))
