"""`show`: what a model is (architecture, size, quantization, shapes, template, license).

Everything comes from headers (GGUF metadata, config.json, safetensors headers); no weights are
loaded, so `minillm show` answers in a fraction of a second.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from minillm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from minillm.formats.gguf import read_header as read_gguf_header
from minillm.formats.gguf_check import check_model_header
from minillm.hub.ref import ModelRef
from minillm.hub.registry import tree_size
from minillm.hub.resolver import resolve
from minillm.hub.safetensors_header import read_safetensors_header
from minillm.hub.units import human_count


def _dominant(counter: Counter[str]) -> str | None:
    return counter.most_common(1)[0][0] if counter else None


def _shape_facts(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "layers": cfg.num_layers,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def _gguf_file_type(md: dict[str, Any]) -> str | None:
    from gguf import LlamaFileType

    ft = md.get("general.file_type")
    if ft is None:
        return None
    try:
        name = LlamaFileType(int(ft)).name
    except (TypeError, ValueError):  # a type newer than gguf-py knows, or a corrupt value
        return f"file type {ft!r:.40}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _token_count(md: dict[str, Any]) -> int | None:
    tokens = md.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else None


def describe_gguf(path: Path) -> dict[str, Any]:
    """Facts from the header. A file minillm could not load fails here too (GGUFError), so
    `show` never describes a corrupt file as if it were a model."""
    header = read_gguf_header(path)
    md = header.metadata
    arch = md["general.architecture"]  # the reader made sure it is a non-empty string
    by_elements: Counter[str] = Counter()
    for t in header.tensors:
        by_elements[t.type_name] += t.n_elements
    facts: dict[str, Any] = {
        "architecture": arch,
        "parameters": (n := sum(t.n_elements for t in header.tensors)),
        "parameter_size": human_count(n),
        "quantization": _gguf_file_type(md) or _dominant(by_elements),
        "tensor_types": dict(Counter(t.type_name for t in header.tensors)),
    }
    if arch in SUPPORTED_ARCHITECTURES:
        facts.update(_shape_facts(check_model_header(path, md, header.tensors)))
    else:  # an architecture minillm cannot run: still show what the header says
        facts.update(
            context_length=md.get(f"{arch}.context_length"),
            embedding_length=md.get(f"{arch}.embedding_length"),
            layers=md.get(f"{arch}.block_count"),
            heads=md.get(f"{arch}.attention.head_count"),
            kv_heads=md.get(f"{arch}.attention.head_count_kv"),
            vocab_size=md.get(f"{arch}.vocab_size") or _token_count(md),
        )
    facts["chat_template"] = md.get("tokenizer.chat_template")
    facts["license"] = md.get("general.license")
    facts["model_name"] = md.get("general.name")
    return facts


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        template = json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    return None


def _hf_license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip() == "---":  # YAML front matter of a model card
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip()
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8", errors="replace").strip()
    return None


def describe_hf(folder: Path) -> dict[str, Any]:
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = [t for f in sorted(folder.glob("*.safetensors")) for t in read_safetensors_header(f)]
    by_elements: Counter[str] = Counter()
    for t in tensors:
        by_elements[t.dtype] += t.n_elements
    facts: dict[str, Any] = {
        "architecture": raw.get("model_type", "unknown"),
        "parameters": (n := sum(t.n_elements for t in tensors)),
        "parameter_size": human_count(n),
        "quantization": _dominant(by_elements),
        "tensor_types": dict(Counter(t.dtype for t in tensors)),
    }
    try:
        facts.update(_shape_facts(ModelConfig.from_hf_config(raw)))
    except (ValueError, KeyError):
        facts.update(
            context_length=raw.get("max_position_embeddings"),
            embedding_length=raw.get("hidden_size"),
            layers=raw.get("num_hidden_layers"),
            heads=raw.get("num_attention_heads"),
            kv_heads=raw.get("num_key_value_heads"),
            vocab_size=raw.get("vocab_size"),
        )
    facts["chat_template"] = _hf_chat_template(folder)
    facts["license"] = _hf_license(folder)
    facts["model_name"] = raw.get("_name_or_path") or folder.name
    return facts


def describe(ref: ModelRef) -> dict[str, Any]:
    """All `show` facts for a resolved model, as a JSON-ready dict."""
    facts = describe_gguf(ref.path) if ref.format == "gguf" else describe_hf(ref.path)
    return {
        "name": ref.name,
        "source": ref.source,
        "format": ref.format,
        "path": str(ref.path),
        "size": tree_size(ref.path),
        **facts,
    }


def show(name: str) -> dict[str, Any]:
    """Facts about a model (architecture, parameters, quantization, shapes, template, license).

    A model made by `minillm create` also reports its Modelfile: system prompt, parameters,
    and its own template and license where the Modelfile sets them.
    """
    facts = describe(resolve(name))
    from minillm.hub.created import load_profile

    profile = load_profile(name)
    if profile is not None:
        facts["modelfile"] = profile.to_text()
        facts["system"] = profile.system
        facts["modelfile_parameters"] = profile.parameters
        facts["messages"] = profile.messages
        facts["base_model"] = profile.from_
        if profile.template is not None:
            facts["chat_template"] = profile.template
        if profile.license:
            facts["license"] = "\n\n".join(profile.license)
    return facts
