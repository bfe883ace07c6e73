"""Load a model's tensors into one layout, whatever file they came from.

GGUF files name tensors ``blk.N.attn_q.weight`` and permute Q/K rows for llama.cpp's
interleaved RoPE; HF folders name them ``model.layers.N.self_attn.q_proj.weight``. Both end up
in ``ModelWeights`` in the HF row order, so one forward pass (rotate-half RoPE) serves both.
A mixture-of-experts layer (HF Mixtral / Qwen2-MoE folders) holds ``MoEWeights`` instead of
the three dense FFN matrices.
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
class ExpertWeights:
    """One SwiGLU feed-forward: a routed expert, or Qwen2-MoE's shared expert."""

    w_gate: QuantTensor  # (f, d)
    w_up: QuantTensor  # (f, d)
    w_down: QuantTensor  # (d, f)


@dataclass
class MoEWeights:
    """A routed feed-forward. `experts` maps expert id -> weights: the whole model holds every
    id; an expert-parallel rank holds only its own (parallel/ep_moe.py)."""

    router: QuantTensor  # (E, d): one score per expert
    experts: dict[int, ExpertWeights]
    shared: ExpertWeights | None = None
    shared_gate: QuantTensor | None = None  # (1, d)

    def tensors(self) -> list[QuantTensor]:
        out = [self.router] + [t for e in self.experts.values() for t in vars(e).values()]
        if self.shared is not None:
            out += list(vars(self.shared).values())
        return out + ([self.shared_gate] if self.shared_gate is not None else [])


@dataclass
class LayerWeights:
    attn_norm: QuantTensor
    wq: QuantTensor
    wk: QuantTensor
    wv: QuantTensor
    wo: QuantTensor
    ffn_norm: QuantTensor
    w_gate: QuantTensor | None  # the dense FFN; None in an MoE layer
    w_up: QuantTensor | None
    w_down: QuantTensor | None
    bq: QuantTensor | None = None
    bk: QuantTensor | None = None
    bv: QuantTensor | None = None
    moe: MoEWeights | None = None  # the routed FFN of an MoE layer
    # Gemma 3 (model/gemma3.py): RMSNorm weights of each head's q and k, and after attention/FFN
    q_norm: QuantTensor | None = None
    k_norm: QuantTensor | None = None
    post_attn_norm: QuantTensor | None = None
    post_ffn_norm: QuantTensor | None = None


@dataclass
class ModelWeights:
    embed: QuantTensor
    layers: list[LayerWeights]
    final_norm: QuantTensor
    lm_head: QuantTensor | None  # None: tied to embed

    def all_tensors(self) -> list[QuantTensor]:
        out = [self.embed, self.final_norm] + ([self.lm_head] if self.lm_head is not None else [])
        for layer in self.layers:
            out += [t for t in vars(layer).values() if isinstance(t, QuantTensor)]
            out += layer.moe.tensors() if layer.moe is not None else []
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.all_tensors())

    def require_dense(self, what: str) -> None:
        """Refuse a mixture-of-experts model by name in code written for dense MLPs only (the
        compression and export paths), instead of failing later on a missing w_gate."""
        moe = [i for i, layer in enumerate(self.layers) if layer.moe is not None]
        if moe:
            raise ValueError(
                f"{what} supports dense models only; this model has mixture-of-experts layers "
                f"({len(moe)} of {len(self.layers)}, first: layer {moe[0]})"
            )


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
                # Gemma 3's GGUF norms hold (1 + w) already (convert_hf_to_gguf adds the 1)
                q_norm=t.get(p + "attn_q_norm.weight"),
                k_norm=t.get(p + "attn_k_norm.weight"),
                post_attn_norm=t.get(p + "post_attention_norm.weight"),
                post_ffn_norm=t.get(p + "post_ffw_norm.weight"),
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

    def swiglu(prefix: str, gate: str, up: str, down: str) -> ExpertWeights:
        return ExpertWeights(get(prefix + gate), get(prefix + up), get(prefix + down))

    def routed(p: str) -> MoEWeights:
        moe = config.moe
        assert moe is not None
        if config.arch == "mixtral":  # w1 = gate, w3 = up, w2 = down
            b = p + "block_sparse_moe."
            return MoEWeights(
                router=get(b + "gate.weight"),
                experts={
                    e: swiglu(f"{b}experts.{e}.", "w1.weight", "w3.weight", "w2.weight")
                    for e in range(moe.num_experts)
                },
            )
        m, names = p + "mlp.", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        shared = moe.shared_expert_intermediate_size > 0
        return MoEWeights(
            router=get(m + "gate.weight"),
            experts={e: swiglu(f"{m}experts.{e}.", *names) for e in range(moe.num_experts)},
            shared=swiglu(m + "shared_expert.", *names) if shared else None,
            shared_gate=get(m + "shared_expert_gate.weight") if shared else None,
        )

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        sparse = config.moe is not None and config.moe.is_moe_layer(i)
        dense = (
            None if sparse else swiglu(m, "gate_proj.weight", "up_proj.weight", "down_proj.weight")
        )
        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(a + "q_proj.weight"),
                wk=get(a + "k_proj.weight"),
                wv=get(a + "v_proj.weight"),
                wo=get(a + "o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
                w_gate=None if dense is None else dense.w_gate,
                w_up=None if dense is None else dense.w_up,
                w_down=None if dense is None else dense.w_down,
                bq=t.get(a + "q_proj.bias"),
                bk=t.get(a + "k_proj.bias"),
                bv=t.get(a + "v_proj.bias"),
                moe=routed(p) if sparse else None,
            )
        )
    lm_head = None if config.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(get("model.embed_tokens.weight"), layers, get("model.norm.weight"), lm_head)
