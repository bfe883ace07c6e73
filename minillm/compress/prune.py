"""Pruning: remove weights (unstructured, 2:4) or whole heads and FFN channels (structured).

- **Unstructured** pruning zeroes individual weights. *Magnitude* keeps the largest |W| of each
  matrix. *Wanda* (Sun et al., ICLR 2024) scores a weight by |W_ij| * ||X_j||_2 — its size
  times the norm of the input channel it multiplies over calibration tokens — and compares
  weights within each output row. No retraining, no weight update (SparseGPT's second-order
  update is the heavier alternative).
- **2:4 semi-structured**: in every 4 consecutive weights of a row keep 2. NVIDIA's sparse
  tensor cores (Ampere+) skip the zeros, so it is the one sparsity pattern that speeds up a
  dense GPU matmul ~2x; the scores can be magnitude or Wanda's.
- **Structured** pruning removes whole attention heads and FFN channels, so matrices really
  shrink and every backend gets faster. With grouped-query attention each KV head serves a
  group of query heads, so either the same number of query heads is dropped in every group or
  whole groups (KV head + its query heads) go. Widths stay equal across layers, because one
  ModelConfig (and GGUF's one head count) describes every layer.

Zeroed weights are stored densely (GGUF and safetensors have no sparse type), so unstructured
sparsity saves no memory or time here; it shows what quality each method keeps.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from minillm.compress.calibration import Activations
from minillm.compress.fp32 import as_fp32 as _q
from minillm.compress.fp32 import as_torch as _t
from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor
from minillm.model.weights import LayerWeights, ModelWeights

# linear field -> which calibration input it reads (see calibration.INPUT_KINDS)
LINEAR_INPUTS = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
                 "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "down_in"}  # fmt: skip
UNSTRUCTURED_METHODS = ("magnitude", "wanda", "magnitude-2:4", "wanda-2:4")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True = keep: all but the round(sparsity * numel) smallest |w| of the whole matrix."""
    _check_sparsity(sparsity)
    k = round(sparsity * w.numel())
    keep = torch.ones_like(w, dtype=torch.bool)
    if k:
        keep.view(-1)[w.abs().flatten().topk(k, largest=False).indices] = False
    return keep


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: w (out, in), x_norm (in,) the input channels' L2 norms."""
    if x_norm.shape != (w.shape[1],):
        raise ValueError(
            f"x_norm must have {w.shape[1]} entries (one per input), got {tuple(x_norm.shape)}"
        )
    return w.abs() * x_norm[None, :]


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the round(sparsity * in) lowest scores of each output row (Wanda's groups)."""
    _check_sparsity(sparsity)
    k = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive entries along the last dim."""
    if scores.shape[-1] % m or not 0 < n <= m:
        raise ValueError(f"last dim {scores.shape[-1]} must be a multiple of m={m}, 0 < n <= m")
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def prune_matrix(
    w: torch.Tensor, method: str, sparsity: float = 0.5, x_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """One weight matrix pruned by `method` (UNSTRUCTURED_METHODS); 2:4 ignores `sparsity`."""
    if method not in UNSTRUCTURED_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {UNSTRUCTURED_METHODS}")
    if method.startswith("wanda"):
        if x_norm is None:
            raise ValueError("Wanda needs the input channels' norms (calibration activations)")
        scores = wanda_scores(w, x_norm)
    else:
        scores = w.abs()
    if method.endswith("2:4"):
        keep = n_m_mask(scores, 2, 4)
    elif method == "wanda":
        keep = row_mask(scores, sparsity)
    else:
        keep = magnitude_mask(w, sparsity)
    return torch.where(keep, w, torch.zeros_like(w))


def prune_model(
    weights: ModelWeights,
    method: str,
    sparsity: float = 0.5,
    activations: Activations | None = None,
) -> ModelWeights:
    """Every linear layer of every block pruned (embeddings and the head are kept), fp32 out."""
    weights.require_dense("pruning")
    if method.startswith("wanda") and activations is None:
        raise ValueError("Wanda needs calibration activations (compress.calibration)")
    layers = []
    for i, lw in enumerate(weights.layers):
        new = {}
        for field, kind in LINEAR_INPUTS.items():
            norm = activations.l2_norm(i, kind) if activations is not None else None
            new[field] = _q(prune_matrix(_t(getattr(lw, field)), method, sparsity, norm))
        layers.append(replace(lw, **new))
    return ModelWeights(weights.embed, layers, weights.final_norm, weights.lm_head)


def sparsity_of(weights: ModelWeights) -> float:
    """Fraction of exact zeros in the block linears."""
    zeros = total = 0
    for lw in weights.layers:
        for field in LINEAR_INPUTS:
            t = getattr(lw, field).dequantize()
            zeros += int((t == 0).sum())
            total += t.size
    return zeros / total


# --------------------------------------------------------------------------- structured
def head_scores(config: ModelConfig, lw: LayerWeights, o_in_norm: torch.Tensor) -> torch.Tensor:
    """Importance of each query head: sum over its o-input channels j of ||X_j||^2 * ||Wo[:, j]||^2.

    That is the energy the head sends through the output projection on calibration text, the
    structured cousin of Wanda's score.
    """
    wo = _t(lw.wo)
    per_channel = o_in_norm.pow(2) * wo.pow(2).sum(0)
    return per_channel.reshape(config.num_heads, config.head_dim).sum(1)


def _rows(q: QuantTensor, idx: torch.Tensor) -> QuantTensor:
    """Keep rows `idx` of a matrix (or entries of a vector, e.g. a bias)."""
    return _q(_t(q)[idx].contiguous())


def _cols(q: QuantTensor, idx: torch.Tensor) -> QuantTensor:
    return _q(_t(q)[:, idx].contiguous())


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_heads(
    config: ModelConfig,
    weights: ModelWeights,
    activations: Activations,
    heads_per_group: int | None = None,
    kv_groups: int | None = None,
) -> tuple[ModelConfig, ModelWeights]:
    """Drop attention heads, GQA-consistently, by `head_scores` on calibration activations.

    `heads_per_group`: keep that many query heads in every KV group (KV heads all stay).
    `kv_groups`: keep that many whole KV groups (a KV head and all its query heads).
    """
    group = config.num_heads // config.num_kv_heads
    if (heads_per_group is None) == (kv_groups is None):
        raise ValueError("give exactly one of heads_per_group and kv_groups")
    if heads_per_group is not None and not 0 < heads_per_group <= group:
        raise ValueError(f"heads_per_group must be in 1..{group}, got {heads_per_group}")
    if kv_groups is not None and not 0 < kv_groups <= config.num_kv_heads:
        raise ValueError(f"kv_groups must be in 1..{config.num_kv_heads}, got {kv_groups}")
    d = config.head_dim
    layers = []
    for i, lw in enumerate(weights.layers):
        scores = head_scores(config, lw, activations.l2_norm(i, "o_in")).reshape(-1, group)
        if heads_per_group is not None:
            kept_kv = torch.arange(config.num_kv_heads)
            best = scores.topk(heads_per_group, dim=1).indices.sort(dim=1).values
            kept_q = (kept_kv[:, None] * group + best).reshape(-1)
        else:
            kept_kv = scores.sum(1).topk(kv_groups).indices.sort().values
            kept_q = (kept_kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        q_rows, kv_rows = _head_rows(kept_q, d), _head_rows(kept_kv, d)
        layers.append(replace(
            lw, wq=_rows(lw.wq, q_rows), wk=_rows(lw.wk, kv_rows), wv=_rows(lw.wv, kv_rows),
            wo=_cols(lw.wo, q_rows),
            bq=None if lw.bq is None else _rows(lw.bq, q_rows),
            bk=None if lw.bk is None else _rows(lw.bk, kv_rows),
            bv=None if lw.bv is None else _rows(lw.bv, kv_rows),
        ))  # fmt: skip
    kv = config.num_kv_heads if kv_groups is None else kv_groups
    heads = kv * (group if heads_per_group is None else heads_per_group)
    new_config = replace(config, num_heads=heads, num_kv_heads=kv)
    return new_config, ModelWeights(weights.embed, layers, weights.final_norm, weights.lm_head)


def channel_scores(lw: LayerWeights, down_in_norm: torch.Tensor) -> torch.Tensor:
    """Importance of each FFN channel c: ||X_c|| * ||W_down[:, c]|| (Wanda's score, per column)."""
    return down_in_norm * _t(lw.w_down).norm(dim=0)


def prune_mlp_channels(
    config: ModelConfig, weights: ModelWeights, activations: Activations, keep: int
) -> tuple[ModelConfig, ModelWeights]:
    """Keep the `keep` most important FFN channels of every layer (gate/up rows, down columns)."""
    if not 0 < keep <= config.intermediate_size:
        raise ValueError(f"keep must be in 1..{config.intermediate_size}, got {keep}")
    layers = []
    for i, lw in enumerate(weights.layers):
        kept = (
            channel_scores(lw, activations.l2_norm(i, "down_in")).topk(keep).indices.sort().values
        )
        layers.append(replace(lw, w_gate=_rows(lw.w_gate, kept), w_up=_rows(lw.w_up, kept),
                              w_down=_cols(lw.w_down, kept)))  # fmt: skip
    new_config = replace(config, intermediate_size=keep)
    return new_config, ModelWeights(weights.embed, layers, weights.final_norm, weights.lm_head)
