"""Weight quantization: int8 per channel, int4 per group, GGUF block formats, whole models.

Post-training quantization (PTQ) replaces each weight matrix W (out, in) by small integers
and a few float scales, with no retraining. Two classic schemes, in the spirit of gpt-fast's
``quantize.py`` (a page of code each), live in ``int_quant.py`` and are re-exported here:
W8A16 int8 per channel, and W4A16 int4 per group (group 32 is exactly GGUF's Q4_1 layout).

"A16" means activations stay in 16/32-bit floats: the weights are dequantized on the fly, so
the saving is memory and bandwidth (what bounds decode speed), not arithmetic.

`quantize_model` applies a method to every linear layer of a model; embeddings and norms are
left as they are (token_embd is stored as Q8_0 when the source keeps it in a float format).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from minillm.compress.awq import awq_scale_model
from minillm.compress.fp32 import as_fp32 as _fp32
from minillm.compress.int_quant import (
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    fake_quantize_int4,
    fake_quantize_int8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from minillm.compress.methods import CLI_METHODS, EXPERIMENT_METHODS
from minillm.config import ModelConfig
from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor, quantize
from minillm.model.weights import LayerWeights, ModelWeights

__all__ = [  # the tensor-level schemes stay importable from here (lessons, homework)
    "BLOCK_METHODS",
    "FAKE_INT4_METHODS",
    "LINEAR_FIELDS",
    "METHODS",
    "QuantizedModel",
    "dequantize_int4_groupwise",
    "dequantize_int8_per_channel",
    "dequantized_model",
    "fake_quantize_int4",
    "fake_quantize_int8",
    "quantize_int4_groupwise",
    "quantize_int8_per_channel",
    "quantize_model",
]

LINEAR_FIELDS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

# --------------------------------------------------------------------------- whole models

# method -> (format of the linear weights, format where a row does not fit its blocks)
BLOCK_METHODS: dict[str, tuple[str, str]] = {
    "q8_0": ("Q8_0", "Q8_0"),
    "q5_0": ("Q5_0", "Q5_0"),
    "q4_0": ("Q4_0", "Q4_0"),
    "q4_1": ("Q4_1", "Q4_1"),
    "int4": ("Q4_1", "Q4_1"),  # group 32, asymmetric: exactly Q4_1's layout
    # K-quants need rows of 256 weights. For narrower rows llama.cpp's llama-quantize falls back
    # to a 32-weight format one step more precise (Q4_K -> Q5_0, Q6_K -> Q8_0), so a "Q4_K"
    # model of SmolLM2 (hidden size 576 = 2.25 x 256) is Q4_K only in ffn_down, Q5_0 elsewhere.
    "q4_k": ("Q4_K", "Q5_0"),
    "q6_k": ("Q6_K", "Q8_0"),
}
FAKE_INT4_METHODS = {"int4-g128": 128, "int4-g64": 64}  # in memory only: no GGUF layout
METHODS = (*CLI_METHODS, *EXPERIMENT_METHODS)


@dataclass
class QuantizedModel:
    """A quantized model as minillm runs it, plus what writing it to GGUF needs."""

    config: ModelConfig
    weights: ModelWeights
    method: str
    file_type: str  # llama.cpp general.file_type, by our format name
    int8_names: frozenset[str] = frozenset()  # GGUF names stored as I8 + ".scale"
    storable: bool = True  # False: a fake-quantized experiment with no GGUF layout

    @property
    def linear_bits_per_weight(self) -> float:
        """Average storage bits per weight of the linear layers (the quantized part)."""
        bits = n = 0
        for lw in self.weights.layers:
            for f in LINEAR_FIELDS:
                t = getattr(lw, f)
                per = _bits(t, int8=bool(self.int8_names))
                bits += per * t.n_elements
                n += t.n_elements
        return bits / n


def _bits(t: QuantTensor, int8: bool) -> float:
    if int8 and t.format == "F32":  # folded int8 rows: 8 bits + one fp32 scale per row
        return 8.0 + 32.0 / t.shape[-1]
    return t.bits_per_weight


def _fits(fmt: str, n: int) -> bool:
    return n % BLOCK_LAYOUT[fmt][0] == 0


def _to_format(t: QuantTensor, fmt: str, fallback: str) -> QuantTensor:
    values = t.dequantize()
    return quantize(values, fmt if _fits(fmt, t.shape[-1]) else fallback)


def _map_linears(weights: ModelWeights, fn) -> ModelWeights:  # noqa: ANN001 - QuantTensor -> QuantTensor
    layers = [
        replace(lw, **{f: fn(getattr(lw, f)) for f in LINEAR_FIELDS}) for lw in weights.layers
    ]
    return ModelWeights(weights.embed, layers, weights.final_norm, weights.lm_head)


def _storage_embeddings(weights: ModelWeights) -> ModelWeights:
    """token_embd and output as stored: their source block format, else Q8_0."""

    def keep_or_q8(t: QuantTensor | None) -> QuantTensor | None:
        if t is None or t.format not in ("F32", "F16", "BF16"):
            return t
        return quantize(t.dequantize(), "Q8_0") if _fits("Q8_0", t.shape[-1]) else t

    return replace(weights, embed=keep_or_q8(weights.embed), lm_head=keep_or_q8(weights.lm_head))


def quantize_model(
    config: ModelConfig,
    weights: ModelWeights,
    method: str,
    calibration: list[int] | None = None,
) -> QuantizedModel:
    """Quantize every linear layer of a model with `method` (see METHODS).

    `calibration` (token ids) is needed by the activation-aware methods (awq-*).
    """
    weights.require_dense("quantization")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    base = _storage_embeddings(weights)
    if method in BLOCK_METHODS:
        fmt, fallback = BLOCK_METHODS[method]
        out = _map_linears(base, lambda t: _to_format(t, fmt, fallback))
        return QuantizedModel(config, out, method, fmt)
    if method == "int8":
        out = _map_linears(
            base, lambda t: _fp32(fake_quantize_int8(torch.from_numpy(t.dequantize())))
        )
        names = frozenset(
            f"blk.{i}.{n}.weight"
            for i in range(config.num_layers)
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        )
        return QuantizedModel(config, out, method, "Q8_0", int8_names=names)
    if method in FAKE_INT4_METHODS:
        group = FAKE_INT4_METHODS[method]
        out = _map_linears(
            base, lambda t: _fp32(fake_quantize_int4(torch.from_numpy(t.dequantize()), group))
        )
        return QuantizedModel(config, out, method, "F32", storable=False)
    # activation-aware: scale salient input channels up before quantizing (compress/awq.py)
    if calibration is None:
        raise ValueError(f"{method} needs calibration token ids")
    group = 128 if method.endswith("g128") else 32
    scaled = awq_scale_model(config, weights, calibration, group_size=group).weights
    scaled = _storage_embeddings(scaled)
    if group == 32:
        out = _map_linears(scaled, lambda t: _to_format(t, "Q4_1", "Q4_1"))
        return QuantizedModel(config, out, method, "Q4_1")
    out = _map_linears(
        scaled, lambda t: _fp32(fake_quantize_int4(torch.from_numpy(t.dequantize()), group))
    )
    return QuantizedModel(config, out, method, "F32", storable=False)


def dequantized_model(weights: ModelWeights) -> ModelWeights:
    """Every tensor as fp32: the reference a quantized model is compared with."""

    def f(t: QuantTensor | None) -> QuantTensor | None:
        return None if t is None else (t if t.format == "F32" else _fp32(t.dequantize()))

    layers = [LayerWeights(**{k: f(v) for k, v in vars(lw).items()}) for lw in weights.layers]
    return ModelWeights(f(weights.embed), layers, f(weights.final_norm), f(weights.lm_head))
