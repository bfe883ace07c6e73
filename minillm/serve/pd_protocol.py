"""What both halves of a prefill/decode pair agree on: the mode names, the internal header, and
the identity (model bytes and K/V layout) that must match before K/V may cross."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minillm.llm import LLM
from minillm.parallel.pd_transfer import KVLayout

PD_HEADER = "X-Minillm-PD"
PD_HEADER_VALUE = "decode"
DISAGGREGATION_MODES = ("null", "prefill", "decode")  # SGLang's --disaggregation-mode values


@dataclass(frozen=True)
class PDIdentity:
    """What must match between the two servers of a pair: the model's bytes and K/V layout."""

    model: str
    fingerprint: str
    layout: KVLayout

    @classmethod
    def of(cls, llm: LLM, model_name: str, fingerprint: str) -> PDIdentity:
        c = llm.loaded.config
        return cls(model_name, fingerprint, KVLayout(c.num_layers, c.num_kv_heads, c.head_dim))

    def as_json(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "num_layers": lay.num_layers,
            "num_kv_heads": lay.num_kv_heads,
            "head_dim": lay.head_dim,
            "dtype": "float32",
        }
