"""ModelConfig: the few numbers that fix a Llama-family transformer's shapes.

Read from GGUF metadata (``llama.block_count`` ...) or from a Hugging Face ``config.json``;
both families we run (Llama, Qwen2) share one config because they share one forward pass.
Mixture-of-experts models (Mixtral, Qwen2-MoE; HF folders only) are the same transformer with
some feed-forward blocks replaced by routed experts: ``ModelConfig.moe`` (a ``MoEConfig``)
says which and how many; it is None for a dense model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from minillm.config_gemma3 import Gemma3Options

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")  # dense; gemma3 from GGUF only
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")  # HF folders only (no MoE GGUF ships here)
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


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
        raise ValueError(f"{name} must be a positive integer below 2**31, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """The routed feed-forward of an MoE model (Mixtral / Qwen2-MoE layout).

    Each MoE layer has num_experts SwiGLU experts of moe_intermediate_size; a router (a linear
    d -> num_experts) scores them per token, softmax, keeps the num_experts_per_tok best and,
    if norm_topk_prob, rescales those weights to sum to 1 (Mixtral always does). Qwen2-MoE adds
    a shared expert of shared_expert_intermediate_size (0: none) that every token runs, scaled
    by sigmoid(shared_expert_gate . h). Layers listed in dense_layers keep a plain SwiGLU FFN of
    the model's intermediate_size.
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _positive("num_experts", self.num_experts)
        _positive("moe_intermediate_size", self.moe_intermediate_size)
        k = self.num_experts_per_tok
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..num_experts={self.num_experts}, got {k!r}"
            )
        if self.shared_expert_intermediate_size:
            _positive("shared_expert_intermediate_size", self.shared_expert_intermediate_size)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers


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
    moe: MoEConfig | None = None  # None: every layer's FFN is dense
    gemma3: Gemma3Options | None = None  # Gemma 3's extras (config_gemma3.py); None otherwise

    def __post_init__(self) -> None:
        """Every source (GGUF, config.json, pruning) lands here: sizes size every buffer."""
        archs = SUPPORTED_ARCHITECTURES + MOE_ARCHITECTURES
        if self.arch not in archs:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; minillm runs {', '.join(archs)}"
            )
        if (self.moe is None) == (self.arch in MOE_ARCHITECTURES):
            raise ValueError(
                f"architecture {self.arch!r} "
                + ("needs an MoE config" if self.moe is None else "is dense but has an MoE config")
            )
        if (self.gemma3 is None) == (self.arch == "gemma3"):
            raise ValueError(
                f"architecture {self.arch!r} "
                + ("needs Gemma 3 options" if self.gemma3 is None else "has Gemma 3 options")
            )
        if self.gemma3 is not None and len(self.gemma3.layer_types) != self.num_layers:
            raise ValueError(
                f"gemma3.layer_types has {len(self.gemma3.layer_types)} entries for "
                f"{self.num_layers} layers"
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
        head = 0 if self.tie_word_embeddings else v * d
        if self.gemma3 is not None:  # two more norms per layer, and q/k norms of a head's size
            attn += 2 * d + 2 * self.head_dim
        if self.moe is None:
            return v * d + self.num_layers * (attn + 3 * d * f + 2 * d) + d + head
        m = self.moe
        routed = m.num_experts * (3 * d * m.moe_intermediate_size + d)  # experts + router rows
        shared = (
            3 * d * m.shared_expert_intermediate_size + d
            if m.shared_expert_intermediate_size
            else 0
        )
        ffn = sum(
            routed + shared if m.is_moe_layer(i) else 3 * d * f for i in range(self.num_layers)
        )
        return v * d + self.num_layers * (attn + 2 * d) + ffn + d + head

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 K and V for one token across all layers: what each context slot costs."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], has_output_tensor: bool = False) -> ModelConfig:
        """The config a GGUF header describes. Every number is checked for type, range and
        consistency, and a bad one is named by its GGUF key (callers add the file's name)."""
        arch = md.get("general.architecture", "")
        experts = md.get(f"{arch}.expert_count") if isinstance(arch, str) else None
        if (isinstance(experts, int) and experts > 0) or arch in ("qwen2moe", "mixtral"):
            raise ValueError(
                f"this GGUF holds a mixture-of-experts model ({arch}, {experts} experts); "
                "minillm runs MoE models from Hugging Face folders only (config.json + "
                "safetensors), not from GGUF"
            )
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
            gemma3=(
                Gemma3Options.from_gguf_metadata(
                    md, _gguf_int(md, f"{arch}.block_count"), heads, hidden, head_dim
                )
                if arch == "gemma3"
                else None
            ),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | str | Path) -> ModelConfig:
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        model_type = cfg.get("model_type", "")
        if model_type in ("gemma3", "gemma3_text"):
            raise ValueError(
                "Gemma 3 runs from its GGUF file (e.g. the bundled gemma3-270m); minillm does "
                "not read Gemma 3 Hugging Face folders"
            )
        if model_type not in SUPPORTED_ARCHITECTURES + MOE_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; minillm runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES + MOE_ARCHITECTURES)}"
            )
        window = cfg.get("sliding_window") and cfg.get("use_sliding_window", True)
        if model_type in MOE_ARCHITECTURES and window:
            raise ValueError(
                f"sliding-window attention (sliding_window={cfg['sliding_window']}) is not "
                "supported for this model type; minillm attends to the whole context"
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
            attention_bias=bool(
                cfg.get("attention_bias", cfg.get("qkv_bias", model_type.startswith("qwen2")))
            ),
            name=str(cfg.get("_name_or_path", "")),
            moe=_hf_moe_config(cfg, int(cfg["num_hidden_layers"])),
        )


def _hf_moe_config(cfg: dict[str, Any], num_layers: int) -> MoEConfig | None:
    """The MoE part of a config.json: Mixtral's or Qwen2-MoE's names; None for a dense one."""
    model_type = cfg.get("model_type")
    if model_type == "mixtral":
        return MoEConfig(
            num_experts=int(cfg["num_local_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["intermediate_size"]),  # Mixtral's experts are the FFN
            norm_topk_prob=True,
        )
    if model_type == "qwen2_moe":
        # a layer is dense if listed in mlp_only_layers or off the decoder_sparse_step grid
        step = int(cfg.get("decoder_sparse_step", 1))
        only = {int(i) for i in cfg.get("mlp_only_layers") or ()}
        dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
        return MoEConfig(
            num_experts=int(cfg["num_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            dense_layers=dense,
        )
    return None
