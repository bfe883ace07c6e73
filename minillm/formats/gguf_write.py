"""Write a model to GGUF, so that minillm, gguf-py, llama.cpp and transformers can all read it.

A GGUF file is metadata (typed key/values: architecture numbers, the tokenizer, the chat
template) plus named tensors in ggml types. Writing one is mostly *naming*: our
``ModelWeights`` keep Hugging Face's row order, and llama.cpp's converter stores the Q/K rows
of ``llama`` models permuted for its interleaved RoPE, so the writer applies that permutation
again (``load_gguf_weights`` undoes it). The bytes themselves go through the `gguf` package's
``GGUFWriter``; our own reader (``formats/gguf.py``) and gguf's ``GGUFReader`` check the result.

Metadata types matter to llama.cpp (it refuses ``block_count`` stored as int64 when it expects
uint32), so metadata copied from a source GGUF keeps the source's exact value types:
``read_typed_metadata`` reads them alongside the values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor
from minillm.formats.gguf import read_header

# our format name -> llama.cpp's "mostly X" file type (general.file_type)
FILE_TYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}

# Metadata that describes the tensors' shapes and storage: recomputed from the config and the
# new weights, never copied from the source.
_SHAPE_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "attention.layer_norm_rms_epsilon", "vocab_size",
)  # fmt: skip


@dataclass(frozen=True)
class TypedValue:
    """A metadata value with the GGUF type it is stored as (arrays: the type of their items)."""

    value: Any
    type: GGUFValueType
    item_type: GGUFValueType | None = None


# ------------------------------------------------------------------------------ metadata
def read_typed_metadata(path: str | os.PathLike[str]) -> dict[str, TypedValue]:
    """Every key/value of a GGUF file's header, with the type the file stores it as."""
    header = read_header(path)
    return {
        key: TypedValue(
            header.metadata[key],
            GGUFValueType(vtype),
            None if item_type is None else GGUFValueType(item_type),
        )
        for key, (vtype, item_type) in header.value_types.items()
    }


def _typed(value: Any, default: GGUFValueType) -> TypedValue:
    return TypedValue(value, default)


def architecture_metadata(
    config: ModelConfig, like: Mapping[str, TypedValue] | None = None
) -> dict[str, TypedValue]:
    """`{arch}.*` shape keys for `config`, stored with the types `like` (a source file) uses."""
    a = config.arch
    wanted: dict[str, Any] = {
        "block_count": config.num_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_heads,
        "attention.head_count_kv": config.num_kv_heads,
        "rope.dimension_count": config.head_dim,
        "rope.freq_base": float(config.rope_theta),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
    }
    if config.head_dim * config.num_heads != config.hidden_size:  # e.g. after pruning heads
        wanted["attention.key_length"] = config.head_dim
        wanted["attention.value_length"] = config.head_dim
    out = {}
    for key, value in wanted.items():
        full = f"{a}.{key}"
        source = (like or {}).get(full)
        if source is not None and source.type != GGUFValueType.ARRAY:
            out[full] = TypedValue(value, source.type)
        elif isinstance(value, float):
            out[full] = _typed(value, GGUFValueType.FLOAT32)
        else:
            out[full] = _typed(int(value), GGUFValueType.UINT32)
    return out


def model_metadata(
    config: ModelConfig,
    source: Mapping[str, TypedValue],
    file_type: str | LlamaFileType,
    extra: Mapping[str, TypedValue] | None = None,
) -> dict[str, TypedValue]:
    """The source file's metadata (tokenizer, names, template), with the shape keys redone from
    `config`, general.file_type set, and `extra` (e.g. ``minillm.*`` notes) added."""
    if isinstance(file_type, str):
        if file_type not in FILE_TYPES:
            raise ValueError(
                f"no llama.cpp file type for {file_type!r}; known: {sorted(FILE_TYPES)}"
            )
        file_type = FILE_TYPES[file_type]
    arch = config.arch
    shape_keys = {f"{arch}.{k}" for k in _SHAPE_KEYS}
    out = {
        k: v
        for k, v in source.items()
        if k not in shape_keys
        and k not in ("general.architecture", "general.alignment")
        and not k.startswith("GGUF.")
    }
    if (
        str(source.get("general.architecture", TypedValue(arch, GGUFValueType.STRING)).value)
        != arch
    ):
        raise ValueError(
            f"source metadata is for {source['general.architecture'].value!r}, config for {arch!r}"
        )
    out.update(architecture_metadata(config, source))
    out["general.file_type"] = TypedValue(int(file_type), GGUFValueType.UINT32)
    out["general.quantization_version"] = TypedValue(2, GGUFValueType.UINT32)
    out.update(extra or {})
    return out


# ------------------------------------------------------------------------------ tokenizer
def _detect_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """tokenizer.ggml.pre for the byte-level pre-tokenizers minillm knows (see tokenizer.py)."""

    def is_byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre_tokenizer and is_byte_level(pre_tokenizer):
        return "gpt-2"
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        parts = pre_tokenizer.get("pretokenizers", [])
        if (
            len(parts) == 2 and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits") and is_byte_level(parts[1])
        ):  # fmt: skip
            return "smollm"
    raise ValueError(
        "cannot name this tokenizer's pre-tokenizer for GGUF (tokenizer.ggml.pre): only plain "
        "byte-level BPE ('gpt-2') and digits + byte-level ('smollm') are recognised; write the "
        "GGUF from a source GGUF instead"
    )


def tokenizer_metadata(tokenizer: Any) -> dict[str, TypedValue]:
    """llama.cpp's tokenizer.* keys for a byte-level BPE `minillm.tokenizer.Tokenizer`.

    A GGUF carries no tokenizer.json, only the vocabulary, the merges, each token's type and
    the special ids; this rebuilds them from the Rust tokenizer's own JSON.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers can be written to GGUF ('gpt2' model)")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i]:
            raise ValueError(f"token ids are not a dense 0..{len(vocab) - 1} range (id {i})")
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = [1] * len(tokens)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4
    S, U32, I32 = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.INT32
    out = {
        "tokenizer.ggml.model": TypedValue("gpt2", S),
        "tokenizer.ggml.pre": TypedValue(_detect_pre(spec.get("pre_tokenizer")), S),
        "tokenizer.ggml.tokens": TypedValue(tokens, GGUFValueType.ARRAY, S),
        "tokenizer.ggml.token_type": TypedValue(types, GGUFValueType.ARRAY, I32),
        "tokenizer.ggml.merges": TypedValue(merges, GGUFValueType.ARRAY, S),
        "tokenizer.ggml.add_bos_token": TypedValue(False, GGUFValueType.BOOL),
    }
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token_id is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = TypedValue(int(token_id), U32)
    if tokenizer.chat_template:
        out["tokenizer.chat_template"] = TypedValue(tokenizer.chat_template, S)
    return out


def metadata_for_hf_model(config: ModelConfig, tokenizer: Any) -> dict[str, TypedValue]:
    """Source metadata for a model that came from a Hugging Face folder (no GGUF to copy)."""
    S = GGUFValueType.STRING
    out = {
        "general.architecture": TypedValue(config.arch, S),
        "general.type": TypedValue("model", S),
    }
    if config.name:
        out["general.name"] = TypedValue(config.name, S)
    out.update(tokenizer_metadata(tokenizer))
    return out


# ------------------------------------------------------------------------------ tensors
def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf's `permute`): gguf_rows = hf_rows[idx].

    Within each head, the first and second halves of the rows are interleaved (0, D/2, 1,
    D/2 + 1, ...), which suits llama.cpp's adjacent-pair RoPE.
    """
    if n_head <= 0 or n_rows % n_head or (n_rows // n_head) % 2:
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of even size")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def gguf_tensors(config: ModelConfig, weights: Any) -> dict[str, QuantTensor]:
    """ModelWeights -> GGUF tensor names, Q/K rows permuted back for llama."""
    weights.require_dense("GGUF export")

    def qk(t: QuantTensor, n_head: int) -> QuantTensor:
        return t.take_rows(permute_rows(t.shape[0], n_head)) if config.arch == "llama" else t

    out: dict[str, QuantTensor] = {"token_embd.weight": weights.embed}
    for i, lw in enumerate(weights.layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = lw.attn_norm
        out[p + "attn_q.weight"] = qk(lw.wq, config.num_heads)
        out[p + "attn_k.weight"] = qk(lw.wk, config.num_kv_heads)
        out[p + "attn_v.weight"] = lw.wv
        out[p + "attn_output.weight"] = lw.wo
        out[p + "ffn_norm.weight"] = lw.ffn_norm
        out[p + "ffn_gate.weight"] = lw.w_gate
        out[p + "ffn_up.weight"] = lw.w_up
        out[p + "ffn_down.weight"] = lw.w_down
        for name, bias, heads in (
            ("attn_q.bias", lw.bq, config.num_heads),
            ("attn_k.bias", lw.bk, config.num_kv_heads),
            ("attn_v.bias", lw.bv, None),
        ):
            if bias is None:
                continue
            if heads is not None and config.arch == "llama":
                values = bias.dequantize()[permute_rows(bias.shape[-1], heads)]
                bias = QuantTensor.from_array(values, bias.format)
            out[p + name] = bias
    out["output_norm.weight"] = weights.final_norm
    if weights.lm_head is not None:
        out["output.weight"] = weights.lm_head
    return out


def _check_fits(name: str, t: QuantTensor | np.ndarray) -> None:
    if isinstance(t, QuantTensor):
        return
    if not isinstance(t, np.ndarray) or t.dtype not in (np.int8, np.float32):
        raise TypeError(f"tensor {name}: need a QuantTensor or an int8/float32 numpy array")


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    tensors: Mapping[str, QuantTensor | np.ndarray],
    metadata: Mapping[str, TypedValue],
) -> Path:
    """Write `tensors` (GGUF names, in order) and `metadata` to `path`; returns the path.

    A QuantTensor is stored in its own ggml type, byte for byte; a plain int8 or float32 numpy
    array as ggml I8 / F32 (used for our per-channel int8 weights and their row scales).
    """
    path = Path(path)
    for name, t in tensors.items():
        _check_fits(name, t)
    writer = GGUFWriter(str(path), arch)
    for key, tv in metadata.items():
        if key == "general.architecture":
            continue
        writer.add_key_value(key, tv.value, tv.type, tv.item_type)
    for name, t in tensors.items():
        if isinstance(t, QuantTensor):
            raw = t.data.reshape(*t.shape[:-1], t.data.shape[-1])
            writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[t.format])
        else:
            writer.add_tensor(name, np.ascontiguousarray(t))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def save_model_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    weights: Any,
    source_metadata: Mapping[str, TypedValue],
    file_type: str | LlamaFileType,
    extra_metadata: Mapping[str, TypedValue] | None = None,
) -> Path:
    """ModelWeights + config -> a GGUF that copies the source's tokenizer and template."""
    if len(weights.layers) != config.num_layers:
        raise ValueError(
            f"config says {config.num_layers} layers, weights have {len(weights.layers)}"
        )
    metadata = model_metadata(config, source_metadata, file_type, extra_metadata)
    return write_gguf(path, config.arch, gguf_tensors(config, weights), metadata)
