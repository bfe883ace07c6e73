"""Mixture-of-experts layers on N tensor-parallel ranks: expert parallel (EP) or expert-sliced.

`LLM(model, tensor_parallel_size=N, enable_expert_parallel=True)` (vLLM's flag):

- attention stays tensor-parallel (heads and the paged KV split over the N ranks, tp_model.py);
  after its all-reduce the residual stream is whole and identical on every rank;
- each MoE layer's experts are split over the ranks: rank r holds experts [r*E/N, (r+1)*E/N)
  whole, plus a replicated router (and Qwen2-MoE's shared expert and its gate, replicated).
  Since every rank has every token, rank r takes its own contiguous slice of the T tokens,
  routes them, sends each (token, expert) pair to the expert's rank and gets the outputs back
  (all-to-all dispatch and combine, ep_dispatch.py), and an all-gather of the N slices makes
  the (T, d) output whole again for the next layer's attention.

Why attention stays TP rather than replicated: each rank then keeps only its own KV heads, as
in a dense TP run, and the executor, KV cache and scheduler stay exactly those of TP. The price
is the all-gather after each MoE layer ((N-1)/N of the T x d activations per rank), which a
sequence-parallel layout would fold into the attention all-reduce (reduce-scatter + gather).

Without enable_expert_parallel an MoE model under TP shards every expert Megatron-style (gate
and up by rows, down by columns, all-reduce after the layer), like a dense FFN; every rank then
runs every chosen expert on every token, on 1/N of its width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from minillm.config import ModelConfig, MoEConfig
from minillm.model.moe import ExpertCounts, MoEFeedForward
from minillm.model.weights import ExpertWeights, ModelWeights, MoEWeights
from minillm.parallel import traffic
from minillm.parallel.config import ParallelConfig
from minillm.parallel.ep_dispatch import combine, dispatch
from minillm.parallel.shard import columns, rows

# ----------------------------------------------------------------------------- sizes


def valid_ep_sizes(config: ModelConfig) -> list[int]:
    """Every N that splits the experts evenly and the attention heads and KV heads (TP);
    the dense FFN too when some layers have one."""
    assert config.moe is not None
    must = [config.moe.num_experts, config.num_heads, config.num_kv_heads]
    must += [config.intermediate_size] if config.moe.dense_layers else []
    return [n for n in range(1, min(must) + 1) if all(v % n == 0 for v in must)]


def check_expert_parallel(config: ModelConfig, size: int) -> None:
    """A clear error when enable_expert_parallel cannot split this model over `size` ranks."""
    if config.moe is None:
        raise ValueError(
            f"enable_expert_parallel=True needs a mixture-of-experts model, but this "
            f"{config.arch} model is dense (no experts to split); drop enable_expert_parallel"
        )
    if size in valid_ep_sizes(config):
        return
    sizes = ", ".join(str(n) for n in valid_ep_sizes(config))
    raise ValueError(
        f"tensor_parallel_size={size} with enable_expert_parallel does not divide this "
        f"model's num_experts={config.moe.num_experts}, num_heads={config.num_heads} and "
        f"num_kv_heads={config.num_kv_heads}"
        + (f" and intermediate_size={config.intermediate_size}" if config.moe.dense_layers else "")
        + f" evenly; each rank needs the same number of whole experts and heads, so use one "
        f"of: {sizes}"
    )


def check_moe_split(config: ModelConfig, parallel: ParallelConfig) -> None:
    """Before any weight is cut: can this model's experts be split the way `parallel` asks?"""
    tp = parallel.tensor_parallel_size
    if parallel.enable_expert_parallel:
        check_expert_parallel(config, tp)
    elif config.moe is not None and tp > 1:
        check_expert_sliced(config, tp)


def check_expert_sliced(config: ModelConfig, size: int) -> None:
    """A clear error when TP without expert parallelism cannot slice every expert evenly."""
    moe = config.moe
    assert moe is not None
    widths = {"moe_intermediate_size": moe.moe_intermediate_size}
    if moe.shared_expert_intermediate_size:
        widths["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    bad = [f"{k}={v}" for k, v in widths.items() if v % size]
    if bad:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide this MoE model's {' and '.join(bad)}, "
            f"so its experts cannot be sliced evenly; pass enable_expert_parallel=True to split "
            f"whole experts over the ranks instead (sizes that work then: "
            f"{', '.join(str(n) for n in valid_ep_sizes(config))})"
        )


# ----------------------------------------------------------------------------- shards


def expert_range(num_experts: int, rank: int, size: int) -> range:
    """The experts rank `rank` holds under expert parallelism: a contiguous block."""
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


def shard_moe(weights: MoEWeights, rank: int, size: int, expert_parallel: bool) -> MoEWeights:
    """Rank's part of one MoE layer. EP: its whole experts; otherwise every expert's slice.
    The router (and the shared expert's sigmoid gate) are small and replicated."""
    if expert_parallel:
        mine = expert_range(len(weights.experts), rank, size)
        return MoEWeights(
            router=weights.router,
            experts={e: weights.experts[e] for e in mine},
            shared=weights.shared,  # each rank runs it on its own token slice
            shared_gate=weights.shared_gate,
        )

    def sliced(w: ExpertWeights) -> ExpertWeights:
        return ExpertWeights(
            rows(w.w_gate, rank, size), rows(w.w_up, rank, size), columns(w.w_down, rank, size)
        )

    return MoEWeights(
        router=weights.router,
        experts={e: sliced(w) for e, w in weights.experts.items()},
        shared=None if weights.shared is None else sliced(weights.shared),
        shared_gate=weights.shared_gate,
    )


def shard_experts(shard: ModelWeights, rank: int, size: int, expert_parallel: bool) -> ModelWeights:
    """A TP shard (shard.shard_weights, whose MoE layers are still whole) with every MoE
    layer cut to this rank's part (shard_moe)."""
    if size == 1:
        return shard
    layers = [
        lw if lw.moe is None else dataclasses.replace(
            lw, moe=shard_moe(lw.moe, rank, size, expert_parallel)
        )
        for lw in shard.layers
    ]  # fmt: skip
    return dataclasses.replace(shard, layers=layers)


def token_slice(num_tokens: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's contiguous share of the T replicated tokens: ceil(T/N) each, the last shorter
    (or empty: with T < N some ranks route nothing but still serve their experts)."""
    per = -(-num_tokens // size)
    return min(rank * per, num_tokens), min((rank + 1) * per, num_tokens)


# ----------------------------------------------------------------------------- layers


class ExpertParallelMoE:
    """One MoE layer whose experts live on N ranks: route my tokens, all-to-all, run my
    experts, all-to-all back, all-gather the token slices. (T, d) -> (T, d) on every rank."""

    def __init__(
        self,
        weights: MoEWeights,
        config: MoEConfig,
        ops: ModuleType,
        rank: int,
        size: int,
        group: Callable[[], Any],
        counts: ExpertCounts | None = None,
        row: int = 0,
    ) -> None:
        self.local = MoEFeedForward(weights, config, ops, counts, row)
        self.config, self.rank, self.size, self.group = config, rank, size, group

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        group, cfg = self.group(), self.config
        t, d = h.shape
        lo, hi = token_slice(t, self.rank, self.size)
        mine = h[lo:hi]
        weights, ids = self.local.route(mine)  # (T_r, k)
        sent = dispatch(mine, ids, cfg.num_experts, group)
        # every rank saw the (N, E) counts: record the whole batch's, as one process would
        self.local.record(sent.global_counts.sum(dim=0))
        outputs = torch.empty_like(sent.tokens)
        start = 0
        for e, n in zip(self.local.experts, sent.per_local_expert, strict=True):
            if n:
                outputs[start : start + n] = self.local.experts[e](sent.tokens[start : start + n])
            start += n
        pairs = combine(outputs, sent, group).reshape(hi - lo, cfg.num_experts_per_tok, d)
        out = (pairs * weights[..., None]).sum(dim=1)  # each token's k outputs, weighted
        shared = self.local.shared_output(mine)
        if shared is not None:
            out = out + shared
        return self._gather(out.contiguous(), t)

    def _gather(self, out: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """All ranks' (T_r, d) slices -> the whole (T, d), padded to equal size on the wire."""
        per = -(-num_tokens // self.size)
        padded = out.new_zeros((per, out.shape[1]))
        padded[: out.shape[0]] = out
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        traffic.record("ep_gather", padded.numel() * padded.element_size())
        dist.all_gather(parts, padded, group=self.group())
        return torch.cat(parts)[:num_tokens]


class ExpertSlicedMoE:
    """TP without expert parallelism: every expert (and the shared one) holds 1/N of its FFN
    width here, so the layer's output is a partial sum; one all-reduce makes it whole."""

    def __init__(self, local: MoEFeedForward, group: Callable[[], Any]) -> None:
        self.local, self.group = local, group

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = self.local(h)
        traffic.record("tp_all_reduce", y.numel() * y.element_size())
        dist.all_reduce(y, group=self.group())
        return y


def parallel_moe(
    weights: MoEWeights,
    config: MoEConfig,
    ops: ModuleType,
    rank: int,
    size: int,
    expert_parallel: bool,
    group: Callable[[], Any],
    counts: ExpertCounts | None,
    row: int,
) -> Any:
    """The FFN of one MoE layer on TP rank `rank` of `size`, from that rank's shard_moe part.
    (The router counts of the expert-sliced layout are those of every rank's full routing.)"""
    if size == 1:
        return MoEFeedForward(weights, config, ops, counts, row)
    if expert_parallel:
        return ExpertParallelMoE(weights, config, ops, rank, size, group, counts, row)
    return ExpertSlicedMoE(MoEFeedForward(weights, config, ops, counts, row), group)
