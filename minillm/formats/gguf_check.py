"""Does a GGUF header describe a model minillm can run? Checked before any weight is used.

The reader (formats/gguf.py) makes sure the header is well-formed; this checks what it *says*:
the architecture numbers are sane (``ModelConfig.from_gguf_metadata``), every tensor the forward
pass needs is there with the shape those numbers imply, and the tokenizer metadata has the
types and ranges the tokenizer builder relies on (a token id past the vocabulary would index
past the embedding table mid-generation). ``load_model``, ``minillm show`` and ``minillm create``
all call it, so they reject the same files with the same one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import repeat
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig
from minillm.formats.gguf import GGUFError, TensorInfo, read_header
from minillm.formats.int8_rows import SCALE_SUFFIX

_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unk", "pad", "sep", "cls", "mask")


Shapes = dict[str, tuple[int, ...]]


def expected_shapes(config: ModelConfig) -> tuple[Shapes, Shapes]:
    """(required, optional) tensor name -> shape (numpy order) that `config` implies."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    required: Shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    optional: Shapes = {"output.weight": (v, d)}
    for i in range(config.num_layers):
        p = f"blk.{i}."
        required |= {
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (kv, d),
            p + "attn_v.weight": (kv, d),
            p + "attn_output.weight": (d, q),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate.weight": (f, d),
            p + "ffn_up.weight": (f, d),
            p + "ffn_down.weight": (d, f),
        }
        optional |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
        if config.gemma3 is not None:  # QK-norm and the norms after attention and FFN
            head = (config.head_dim,)
            required |= {
                p + "attn_q_norm.weight": head,
                p + "attn_k_norm.weight": head,
                p + "post_attention_norm.weight": (d,),
                p + "post_ffw_norm.weight": (d,),
            }
    return required, optional


def _check_tensors(config: ModelConfig, tensors: list[TensorInfo]) -> None:
    if 9 * config.num_layers > len(tensors):  # before listing 9 names per claimed layer
        raise GGUFError(
            f"{config.arch}.block_count is {config.num_layers}, but the file holds only "
            f"{len(tensors)} tensors (a layer has 9)"
        )
    by_name = {t.name: t for t in tensors}
    required, optional = expected_shapes(config)
    for name in required:
        if name not in by_name:
            why = (
                f" ({config.arch}.block_count is {config.num_layers})" if name[:4] == "blk." else ""
            )
            raise GGUFError(f"tensor {name!r} is missing{why}")
    for name, shape in (required | optional).items():
        if name in by_name and by_name[name].shape != shape:
            raise GGUFError(
                f"tensor {name!r} has shape {by_name[name].shape}, but the metadata implies "
                f"{shape} ({config.arch}.embedding_length, vocab size, head counts...)"
            )
    for t in tensors:
        layer = t.name.split(".", 2)[1] if t.name.startswith("blk.") else ""
        if layer.isdigit() and int(layer) >= config.num_layers:
            raise GGUFError(
                f"tensor {t.name!r} belongs to layer {layer}, but {config.arch}.block_count is "
                f"{config.num_layers}"
            )
        if t.type_name == "I8":  # minillm's per-channel int8: a row scale must sit beside it
            scale = by_name.get(t.name + SCALE_SUFFIX)
            if len(t.shape) != 2 or scale is None or scale.shape != (t.shape[0],):
                raise GGUFError(
                    f"int8 tensor {t.name!r} of shape {t.shape} needs an F32 "
                    f"'{t.name}{SCALE_SUFFIX}' of shape ({t.shape[0]},)"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(value: Any, kind: type) -> bool:
    """A list whose items are all exactly `kind` (type() per item in C: ~1 ms per 50k)."""
    return isinstance(value, list) and set(map(type, value)) <= {kind}


def _check_merges(tokens: list[str], merges: list[str]) -> None:
    """Each merge "left right" must make a token of the vocabulary: `tokenizers` *panics* on
    one that does not (a Rust panic on stderr, not an exception). Merges of unknown halves it
    reports itself, and the loader names the file. One C-level pass: ~7 ms for 49k merges."""
    vocab = set(tokens)
    if not vocab.issuperset(map(str.replace, merges, repeat(" "), repeat(""), repeat(1))):
        bad = next(m for m in merges if m.replace(" ", "", 1) not in vocab)
        raise GGUFError(
            f"metadata 'tokenizer.ggml.merges': the merge {bad!r:.60} makes a token that is "
            "not in the vocabulary"
        )


def check_tokenizer_metadata(md: Mapping[str, Any], vocab_size: int) -> None:
    """The tokenizer.* keys have the types the tokenizer builder expects, and every token id
    they name fits the embedding table (`vocab_size` rows). What only the BPE builder can
    judge (a merge of unknown tokens) is left to it: the loader names the file when it fails."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not _list_of(tokens, str):
            raise GGUFError("metadata 'tokenizer.ggml.tokens' must be a list of strings")
        if len(tokens) > vocab_size:
            raise GGUFError(
                f"metadata 'tokenizer.ggml.tokens' has {len(tokens)} tokens, more than the "
                f"{vocab_size} rows of token_embd.weight"
            )
    merges = md.get("tokenizer.ggml.merges")
    if merges is not None and not _list_of(merges, str):
        raise GGUFError("metadata 'tokenizer.ggml.merges' must be a list of strings")
    if tokens and merges:
        _check_merges(tokens, merges)
    types = md.get("tokenizer.ggml.token_type")
    if types is not None and (not _list_of(types, int) or len(types) != len(tokens or [])):
        raise GGUFError(
            "metadata 'tokenizer.ggml.token_type' must be a list of integers, one per token"
        )
    n_tokens = len(tokens) if tokens is not None else vocab_size
    for name in _SPECIAL_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = md.get(key)
        if value is not None and not (_is_int(value) and 0 <= value < n_tokens):
            raise GGUFError(
                f"metadata {key!r} must be a token id in 0..{n_tokens - 1}, got {value!r:.40}"
            )
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if key in md and not isinstance(md[key], str):
            raise GGUFError(f"metadata {key!r} must be a string, got {md[key]!r:.40}")


def check_model_header(
    path: str | os.PathLike[str], metadata: Mapping[str, Any], tensors: list[TensorInfo]
) -> ModelConfig:
    """The config of a model minillm can run from this header; GGUFError naming the file and
    the field otherwise."""
    has_output = any(t.name == "output.weight" for t in tensors)
    try:
        config = ModelConfig.from_gguf_metadata(dict(metadata), has_output)
        _check_tensors(config, tensors)
        check_tokenizer_metadata(metadata, config.vocab_size)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    return config


def check_gguf_model(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a GGUF header and check it describes a model minillm can run (no weights read)."""
    header = read_header(Path(path))
    return check_model_header(path, header.metadata, header.tensors)
