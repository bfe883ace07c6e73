"""Gemma3Options: what a Gemma 3 model adds to the Llama-family numbers in ModelConfig.

Gemma 3 is the same decoder stack with six twists (model/gemma3.py computes them):
the embeddings are scaled by sqrt(d); the FFN is GeGLU with tanh GELU; every layer has four
RMSNorms (before and after attention, before and after the FFN) plus RMSNorms on each head's
q and k; most layers are *local*: they attend only to the last `sliding_window` positions and
rotate with their own RoPE base (10k), while every `pattern`-th layer is *global* (whole context,
rope base 1e6); and the attention scale is query_pre_attn_scalar^-0.5, not head_dim^-0.5.

A GGUF says little of this: llama.cpp hard-codes the layer pattern (6), the local rope base
(10000) and the attention scale per model size (src/llama-model.cpp, LLM_ARCH_GEMMA3), and so
do we, reading the keys when a file does carry them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_PATTERN = 6  # layers 5, 11, 17, ... are global
DEFAULT_LOCAL_ROPE_THETA = 10_000.0


def _positive_float(key: str, value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{key} must be a positive number, got {value!r:.40}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Gemma3Options:
    """Per-layer attention kinds and the constants only Gemma 3 uses."""

    sliding_window: int  # a local layer's token sees itself and the sliding_window - 1 before it
    layer_types: tuple[str, ...]  # SLIDING or FULL, one per layer
    rope_local_theta: float  # RoPE base of the local layers (global ones use ModelConfig's)
    query_pre_attn_scalar: float  # attention scores are scaled by its inverse square root
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        w = self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"sliding_window must be a positive integer, got {w!r}")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad or not self.layer_types:
            raise ValueError(f"layer_types must be {SLIDING!r} or {FULL!r} per layer, got {bad}")
        _positive_float("rope_local_theta", self.rope_local_theta)
        _positive_float("query_pre_attn_scalar", self.query_pre_attn_scalar)
        if self.final_logit_softcapping is not None:
            _positive_float("final_logit_softcapping", self.final_logit_softcapping)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int:
        """Keys a token of `layer` attends to at most: the window, or 0 for the whole context."""
        return self.sliding_window if self.is_sliding(layer) else 0

    @classmethod
    def from_gguf_metadata(
        cls, md: dict[str, Any], num_layers: int, num_heads: int, hidden: int, head_dim: int
    ) -> Gemma3Options:
        arch = "gemma3"
        for key in ("attn_logit_softcapping",):
            if md.get(f"{arch}.{key}"):
                raise ValueError(
                    f"GGUF metadata '{arch}.{key}' is set; minillm's attention has no soft-capping"
                )
        window = md.get(f"{arch}.attention.sliding_window")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"GGUF metadata '{arch}.attention.sliding_window' must be a positive integer, "
                f"got {window!r:.40}"
            )
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", DEFAULT_PATTERN)
        if isinstance(pattern, list):  # newer files: one bool per layer, True = local
            if len(pattern) != num_layers:
                raise ValueError(
                    f"GGUF metadata '{arch}.attention.sliding_window_pattern' has "
                    f"{len(pattern)} entries for {num_layers} layers"
                )
            types = tuple(SLIDING if p else FULL for p in pattern)
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
            types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
        else:
            raise ValueError(
                f"GGUF metadata '{arch}.attention.sliding_window_pattern' must be a positive "
                f"integer or a list of booleans, got {pattern!r:.40}"
            )
        # llama.cpp: the 27B model (62 layers) scales by d / heads, every other by head_dim
        scalar = hidden // num_heads if num_layers == 62 else head_dim
        cap = md.get(f"{arch}.final_logit_softcapping")
        return cls(
            sliding_window=window,
            layer_types=types,
            rope_local_theta=_positive_float(
                f"GGUF metadata '{arch}.rope.freq_base_swa'",
                md.get(f"{arch}.rope.freq_base_swa", DEFAULT_LOCAL_ROPE_THETA),
            ),
            query_pre_attn_scalar=float(scalar),
            final_logit_softcapping=None if not cap else float(cap),
        )
