"""ModelConfig: the few numbers that fix a Llama-family transformer's shapes.

Read from GGUF metadata (``llama.block_count`` ...) or from a Hugging Face ``config.json``;
both families we run (Llama, Qwen2) share one config because they share one forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Sizes beyond int32 are never real and would overflow index arithmetic downstream.
_MAX_SIZE = 2**31 - 1


def _gguf_int(md: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer from GGUF metadata; a corrupt one is named by its key."""
    value = md.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
        raise ValueError(
            f"GGUF metadata {key!r} must be a positive integer below 2**31, got {value!r:.40}"
        )
    return value


def _gguf_float(md: dict[str, Any], key: str, default: float) -> float:
    """A positive finite number from GGUF metadata (epsilons, RoPE bases)."""
    value = md.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"GGUF metadata {key!r} must be a positive number, got {value!r:.40}")
    return float(value)


def _gguf_vocab_size(md: dict[str, Any], arch: str) -> int:
    """`{arch}.vocab_size` when the file sets it, else the length of the token list."""
    key = f"{arch}.vocab_size"
    if key in md:
        return _gguf_int(md, key)
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(
            f"GGUF metadata has neither {key!r} nor a 'tokenizer.ggml.tokens' list: the "
            "vocabulary size is unknown"
        )
    return len(tokens)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 puts a bias on q/k/v
    name: str = ""

    def __post_init__(self) -> None:
        """Every source (GGUF, config.json, pruning) lands here: sizes size every buffer."""
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; minillm runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE
            ):
                raise ValueError(f"{f.name} must be a positive integer below 2**31, got {value!r}")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if f.type == "float" and not (number and 0 < value < math.inf):
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count from the shapes (embeddings counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + head

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 K and V for one token across all layers: what each context slot costs."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], has_output_tensor: bool = False) -> ModelConfig:
        """The config a GGUF header describes. Every number is checked for type, range and
        consistency, and a bad one is named by its GGUF key (callers add the file's name)."""
        arch = md.get("general.architecture", "")
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r:.40} in GGUF metadata; minillm runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = _gguf_int(md, f"{arch}.embedding_length")
        heads = _gguf_int(md, f"{arch}.attention.head_count")
        kv_heads = _gguf_int(md, f"{arch}.attention.head_count_kv", heads)
        if heads % kv_heads:
            raise ValueError(
                f"GGUF metadata '{arch}.attention.head_count' = {heads} is not a multiple of "
                f"'{arch}.attention.head_count_kv' = {kv_heads}"
            )
        if f"{arch}.attention.key_length" in md:
            head_dim = _gguf_int(md, f"{arch}.attention.key_length")
        elif hidden % heads:
            raise ValueError(
                f"GGUF metadata '{arch}.embedding_length' = {hidden} does not split into "
                f"'{arch}.attention.head_count' = {heads} heads (and no key_length is set)"
            )
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise ValueError(
                f"GGUF metadata gives an odd head size {head_dim}; RoPE rotates pairs of dimensions"
            )
        return cls(
            arch=arch,
            vocab_size=_gguf_vocab_size(md, arch),
            hidden_size=hidden,
            intermediate_size=_gguf_int(md, f"{arch}.feed_forward_length"),
            num_layers=_gguf_int(md, f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_gguf_float(md, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=_gguf_float(md, f"{arch}.rope.freq_base", 10000.0),
            max_position_embeddings=_gguf_int(md, f"{arch}.context_length", 2048),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            name=str(md.get("general.name", "")),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> ModelConfig:
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; minillm runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {rope!r} is not supported by minillm yet")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            arch=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            name=str(cfg.get("_name_or_path", "")),
        )
