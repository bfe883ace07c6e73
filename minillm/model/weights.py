"""Load a model's tensors into one layout, whatever file they came from.

GGUF files name tensors ``blk.N.attn_q.weight`` and permute Q/K rows for llama.cpp's
interleaved RoPE; HF folders name them ``model.layers.N.self_attn.q_proj.weight``. Both end up
in ``ModelWeights`` in the HF row order, so one forward pass (rotate-half RoPE) serves both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor
from minillm.formats.gguf import GGUFFile
from minillm.formats.int8_rows import fold_int8_rows


@dataclass
class LayerWeights:
    attn_norm: QuantTensor
    wq: QuantTensor
    wk: QuantTensor
    wv: QuantTensor
    wo: QuantTensor
    ffn_norm: QuantTensor
    w_gate: QuantTensor
    w_up: QuantTensor
    w_down: QuantTensor
    bq: QuantTensor | None = None
    bk: QuantTensor | None = None
    bv: QuantTensor | None = None


@dataclass
class ModelWeights:
    embed: QuantTensor
    layers: list[LayerWeights]
    final_norm: QuantTensor
    lm_head: QuantTensor | None  # None: tied to embed

    def all_tensors(self) -> list[QuantTensor]:
        out = [self.embed, self.final_norm] + ([self.lm_head] if self.lm_head is not None else [])
        for layer in self.layers:
            out += [t for t in vars(layer).values() if t is not None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.all_tensors())


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp stores each head's rows as interleaved pairs (0, D/2, 1, D/2+1, ...); HF keeps
    the two halves apart. Returns idx with hf_rows = gguf_rows[idx].
    """
    head_dim = n_rows // n_head
    fwd = np.arange(n_rows).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(fwd)


def load_gguf_weights(gguf: GGUFFile, config: ModelConfig) -> ModelWeights:
    t = gguf.tensors
    if gguf.int8_tensors:  # minillm's per-channel int8 (I8 + ".scale"), dequantized at load
        t = fold_int8_rows(t, gguf.int8_tensors)

    def get(name: str) -> QuantTensor:
        if name not in t:
            raise ValueError(f"{gguf.path}: tensor {name!r} is missing")
        return t[name]

    def qk(name: str, n_head: int) -> QuantTensor:
        w = get(name)
        # llama.cpp permutes Q/K for llama only; qwen2 uses the NeoX (rotate-half) layout as is
        return w.take_rows(unpermute_rows(w.shape[0], n_head)) if config.arch == "llama" else w

    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm.weight"),
                wq=qk(p + "attn_q.weight", config.num_heads),
                wk=qk(p + "attn_k.weight", config.num_kv_heads),
                wv=get(p + "attn_v.weight"),
                wo=get(p + "attn_output.weight"),
                ffn_norm=get(p + "ffn_norm.weight"),
                w_gate=get(p + "ffn_gate.weight"),
                w_up=get(p + "ffn_up.weight"),
                w_down=get(p + "ffn_down.weight"),
                bq=t.get(p + "attn_q.bias"),
                bk=t.get(p + "attn_k.bias"),
                bv=t.get(p + "attn_v.bias"),
            )
        )
    return ModelWeights(
        embed=get("token_embd.weight"),
        layers=layers,
        final_norm=get("output_norm.weight"),
        lm_head=t.get("output.weight"),
    )


def _torch_to_quant(tensor) -> QuantTensor:  # noqa: ANN001 - a torch.Tensor
    import torch

    fmt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(tensor.dtype)
    if fmt is None:
        raise ValueError(f"safetensors dtype {tensor.dtype} is not supported (need fp32/fp16/bf16)")
    shape = tuple(tensor.shape) if tensor.dim() > 0 else (1,)
    raw = tensor.contiguous().view(torch.uint8).numpy()
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return QuantTensor(fmt, raw.reshape(rows, -1), shape)


def load_hf_weights(folder: Path, config: ModelConfig) -> ModelWeights:
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoints list their files
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    t: dict[str, QuantTensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                t[key] = _torch_to_quant(sf.get_tensor(key))

    def get(name: str) -> QuantTensor:
        if name not in t:
            raise ValueError(f"{folder}: tensor {name!r} is missing from the safetensors files")
        return t[name]

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(a + "q_proj.weight"),
                wk=get(a + "k_proj.weight"),
                wv=get(a + "v_proj.weight"),
                wo=get(a + "o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                w_gate=get(m + "gate_proj.weight"),
                w_up=get(m + "up_proj.weight"),
                w_down=get(m + "down_proj.weight"),
                bq=t.get(a + "q_proj.bias"),
                bk=t.get(a + "k_proj.bias"),
                bv=t.get(a + "v_proj.bias"),
            )
        )
    lm_head = None if config.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(get("model.embed_tokens.weight"), layers, get("model.norm.weight"), lm_head)
