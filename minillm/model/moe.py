"""Mixture-of-experts (MoE) feed-forward: a router sends each token to k of E small FFNs.

The Mixtral / Qwen2-MoE layout (see config.MoEConfig). For one token h (d,):

    p = softmax(W_router · h)                 (E,)   how much each expert suits the token
    w, ids = top_k(p)                         (k,)   keep the k best (Mixtral: k=2 of 8)
    w = w / sum(w)                            only if norm_topk_prob (Mixtral always)
    y = sum_j w_j · expert_ids_j(h)           each expert is a SwiGLU FFN of its own
    y += sigmoid(w_sg · h) · shared(h)        Qwen2-MoE only: one expert every token runs

Only k of the E experts run per token, so the FLOPs are those of a k-expert model while the
weights are those of all E. The experts run one after another on the rows routed to them
(gathered, computed, scattered back with their weights): the plain loop, the same order as
transformers' MixtralExperts. ExpertCounts records how many tokens each expert received,
which is what load balance (and expert parallelism's traffic) depends on.
Shapes: T tokens, d model dim, E experts, k experts per token, f expert FFN dim.
"""

from __future__ import annotations

from types import ModuleType

import torch

from minillm.config import MoEConfig
from minillm.model.weights import ExpertWeights, MoEWeights


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> weights (T, k) and expert ids (T, k), best first."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:  # the k kept weights sum to 1, whatever the others had
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class ExpertCounts:
    """Router statistics: counts[i, e] = tokens routed to expert e by the i-th MoE layer
    (model layer `layers[i]`) since the last reset. A token counts once per expert it goes
    to, so each row grows by tokens x top_k per forward pass. Kept on by default: one
    bincount of (T, k) ids per layer is nothing next to the experts themselves."""

    def __init__(self, layers: list[int], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self.counts = torch.zeros((len(layers), num_experts), dtype=torch.int64)
        self.enabled = True

    def record(self, row: int, per_expert: torch.Tensor) -> None:
        """Add one forward pass's per-expert token counts (E,) to row `row`."""
        if self.enabled:
            self.counts[row] += per_expert.to(torch.int64)

    def reset(self) -> None:
        self.counts.zero_()

    def load_imbalance(self) -> torch.Tensor:
        """Per layer: the busiest expert's tokens over the mean (1.0 = perfectly balanced).
        Under expert parallelism the step waits for the busiest rank, so this is the slowdown."""
        mean = self.counts.double().mean(dim=1).clamp(min=1e-12)
        return self.counts.double().max(dim=1).values / mean


def per_expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) expert ids -> (E,) how many of them name each expert."""
    return torch.bincount(ids.reshape(-1), minlength=num_experts)


class SwiGLU:
    """One prepared FFN: W_down · (silu(W_gate · h) * W_up · h). (n, d) -> (n, d)."""

    def __init__(self, w: ExpertWeights, ops: ModuleType) -> None:
        self.ops = ops
        lin = ops.prepare_linear
        self.w_gate, self.w_up, self.w_down = lin(w.w_gate), lin(w.w_up), lin(w.w_down)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        return ops.linear(
            ops.silu_mul(ops.linear(h, self.w_gate), ops.linear(h, self.w_up)), self.w_down
        )


class MoEFeedForward:
    """One layer's routed FFN on the backend `ops`. `experts` may hold only some of the ids
    (an expert-parallel rank's share; parallel/ep_moe.py routes the rest elsewhere)."""

    def __init__(
        self,
        weights: MoEWeights,
        config: MoEConfig,
        ops: ModuleType,
        counts: ExpertCounts | None = None,
        row: int = 0,
    ) -> None:
        self.config, self.ops = config, ops
        self.router = ops.prepare_linear(weights.router)
        self.experts = {e: SwiGLU(w, ops) for e, w in sorted(weights.experts.items())}
        self.shared = None if weights.shared is None else SwiGLU(weights.shared, ops)
        self.shared_gate = (
            None if weights.shared_gate is None else ops.prepare_linear(weights.shared_gate)
        )
        self.counts, self.row = counts, row

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (T, d) -> weights (T, k), expert ids (T, k)."""
        logits = self.ops.linear(h, self.router)  # (T, E)
        return route(logits, self.config.num_experts_per_tok, self.config.norm_topk_prob)

    def record(self, per_expert: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts.record(self.row, per_expert)

    def shared_output(self, h: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's always-on expert, scaled by its sigmoid gate; None without one."""
        if self.shared is None or self.shared_gate is None:
            return None
        gate = torch.sigmoid(self.ops.linear(h, self.shared_gate))  # (T, 1)
        return gate * self.shared(h)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (T, d) normalised hidden states -> (T, d) FFN output (every expert is local)."""
        weights, ids = self.route(h)
        self.record(per_expert_counts(ids, self.config.num_experts))
        out = torch.zeros_like(h)
        for e in ids.unique().tolist():  # only the experts some token chose
            tok, slot = torch.where(ids == e)  # which tokens, and which of their k picks
            y = self.experts[e](h[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        shared = self.shared_output(h)
        return out if shared is None else out + shared
