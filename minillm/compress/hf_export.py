"""Save a model as a Hugging Face folder: config.json, model.safetensors and the tokenizer.

Pruned and distilled models change shapes (heads, FFN width, layers), which GGUF can carry too,
but an HF folder is what training tools and `transformers` read natively. The folder is what
`minillm.testing.make_tiny_model` writes, so `LLM(folder)` and
`transformers.AutoModelForCausalLM.from_pretrained(folder)` both load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from minillm.config import ModelConfig
from minillm.model.weights import ModelWeights

_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_dict(config: ModelConfig, tokenizer: Any) -> dict[str, Any]:
    """config.json for `config` (fields as transformers' LlamaConfig / Qwen2Config name them)."""
    return {
        "architectures": [_CLASSES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
        "_name_or_path": config.name,
    }


def hf_state_dict(config: ModelConfig, weights: ModelWeights) -> dict[str, torch.Tensor]:
    """ModelWeights (HF row order already) -> HF tensor names, dequantized to fp32."""
    weights.require_dense("HF export")

    def t(q) -> torch.Tensor:  # noqa: ANN001 - QuantTensor
        return torch.from_numpy(np.array(q.dequantize(), dtype=np.float32))

    out = {
        "model.embed_tokens.weight": t(weights.embed),
        "model.norm.weight": t(weights.final_norm),
    }
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[p + "input_layernorm.weight"] = t(lw.attn_norm)
        out[p + "post_attention_layernorm.weight"] = t(lw.ffn_norm)
        for name, q in (("q_proj", lw.wq), ("k_proj", lw.wk), ("v_proj", lw.wv), ("o_proj", lw.wo)):
            out[a + name + ".weight"] = t(q)
        for name, b in (("q_proj", lw.bq), ("k_proj", lw.bk), ("v_proj", lw.bv)):
            if b is not None:
                out[a + name + ".bias"] = t(b).reshape(-1)
        for name, q in (("gate_proj", lw.w_gate), ("up_proj", lw.w_up), ("down_proj", lw.w_down)):
            out[m + name + ".weight"] = t(q)
    if weights.lm_head is not None and not config.tie_word_embeddings:
        out["lm_head.weight"] = t(weights.lm_head)
    return out


def save_tokenizer(folder: Path, tokenizer: Any) -> None:
    """tokenizer.json (the Rust tokenizer as is) + tokenizer_config.json + generation_config."""
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation = {"bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": sorted(tokenizer.eos_token_ids)}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def save_hf_folder(
    folder: str | os.PathLike[str],
    config: ModelConfig,
    tensors: ModelWeights | dict[str, torch.Tensor],
    tokenizer: Any,
) -> Path:
    """Write an HF folder; `tensors` is ModelWeights or an HF-named fp32 state dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(config, tensors) if isinstance(tensors, ModelWeights) else tensors
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config_dict(config, tokenizer)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tokenizer(folder, tokenizer)
    return folder
