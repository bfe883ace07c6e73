"""What splitting a model over several accelerators costs in memory and in traffic.

Lesson 14 and benchmarks/bench_parallel.py hold these formulas against bytes measured on real
process groups; the planner recomputes the course notes' scale table ("which strategy at which
model size") from a model's shapes instead of quoting it.

Traffic per generated token (activations of ``act_bytes`` each, hidden size d, L layers):

- tensor parallel (TP, degree t): two all-reduces per layer (after attention's o and the MLP's
  down projection), each of d values; a ring all-reduce makes every rank send
  ``2 (t-1)/t`` times the buffer;
- pipeline parallel (PP, p stages): one d-vector crosses each of the p - 1 stage boundaries;
- expert parallel (EP, degree e): each token's hidden vector goes to its k experts and comes
  back (dispatch + combine); a fraction (e-1)/e of the experts live on other ranks;
- context parallel (CP, degree c, ring attention): for a prefill of n tokens every rank passes
  its K/V chunk around the ring c - 1 times per layer;
- prefill/decode disaggregation (PD): the prompt's whole KV cache moves once per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minillm.estimate import (
    GB,
    ModelSpec,
    get_gpu,
    kv_bytes_per_token,
    kv_cache_bytes,
    non_negative,
    positive_int,
    weights_bytes,
)

# ---------------------------------------------------------------------------- interconnects


@dataclass(frozen=True)
class Link:
    """One direction of a link between accelerators: its bandwidth and the fixed time one small
    message or collective pays (the part that dominates decode, whose messages are a few KiB).

    Bandwidths are the vendors' spec-sheet figures; latencies are orders of magnitude for a
    small NCCL collective over that link (measure your own with nccl-tests), not guarantees.
    """

    name: str
    bandwidth_gb_s: float  # per direction, GB/s (1e9 bytes)
    latency_us: float  # one small message / collective, microseconds

    def seconds(self, num_bytes: float, messages: int = 1) -> float:
        """Time to move ``num_bytes`` split into ``messages`` messages."""
        b = non_negative("num_bytes", num_bytes)
        return messages * self.latency_us * 1e-6 + b / (self.bandwidth_gb_s * GB)


LINKS: dict[str, Link] = {
    link.name: link
    for link in [
        Link("NVLink4 (H100 SXM)", 450, 8),  # 900 GB/s both directions per GPU
        Link("PCIe 5.0 x16", 64, 15),
        Link("PCIe 4.0 x16", 32, 15),
        Link("InfiniBand NDR 400G", 50, 25),
        Link("Ethernet 100G", 12.5, 50),
    ]
}


# ---------------------------------------------------------------------------- traffic per token
def ring_all_reduce_bytes(buffer_bytes: float, world_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of a buffer: reduce-scatter then all-gather,
    each (n-1)/n of the buffer."""
    n = positive_int("world_size", world_size)
    return 2 * (n - 1) / n * non_negative("buffer_bytes", buffer_bytes)


def tp_bytes_per_token(spec: ModelSpec, tp: int, act_bytes: float = 2) -> float:
    """Bytes one rank sends per token under TP: 2 all-reduces of d values in every layer."""
    buffer = spec.hidden_size * non_negative("act_bytes", act_bytes)
    return 2 * spec.num_layers * ring_all_reduce_bytes(buffer, tp)


def tp_messages_per_token(spec: ModelSpec, tp: int) -> int:
    """All-reduces per forward step under TP, each paying the link's small-collective latency:
    this, not bandwidth, bounds small-batch decode across slow links."""
    return 0 if positive_int("tp", tp) == 1 else 2 * spec.num_layers


def pp_bytes_per_token(spec: ModelSpec, pp: int, act_bytes: float = 2) -> float:
    """Bytes sent per token under PP: one d-vector across each of the p - 1 stage boundaries."""
    return (positive_int("pp", pp) - 1) * spec.hidden_size * non_negative("act_bytes", act_bytes)


def ep_bytes_per_token(spec: ModelSpec, ep: int, act_bytes: float = 2) -> float:
    """Bytes sent per token under EP, summed over the MoE layers: dispatch and combine of the
    token's hidden vector for each of its k experts that lives on another rank."""
    if not spec.is_moe:
        raise ValueError(f"{spec.name} has no experts: expert parallelism needs an MoE model")
    e = positive_int("ep", ep)
    remote = (e - 1) / e
    per_layer = 2 * spec.experts_per_tok * spec.hidden_size * act_bytes * remote
    return spec.num_layers * per_layer


def cp_bytes_per_prefill(
    spec: ModelSpec, cp: int, num_tokens: int, kv_bytes_per_elem: float = 2
) -> float:
    """Bytes all ranks send together for one ring-attention prefill of ``num_tokens``: each of
    the c ranks passes its K/V chunk (n/c tokens) on c - 1 times in every layer."""
    c = positive_int("cp", cp)
    n = positive_int("num_tokens", num_tokens)
    return (c - 1) * n * kv_bytes_per_token(spec, kv_bytes_per_elem)


def pd_kv_bytes(spec: ModelSpec, prompt_tokens: int, kv_bytes_per_elem: float = 2) -> float:
    """Bytes a prefill server sends a decode server per request: the prompt's KV cache."""
    return kv_cache_bytes(spec, positive_int("prompt_tokens", prompt_tokens), 1, kv_bytes_per_elem)


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a GPipe-style pipeline step: (p - 1) / (m + p - 1)."""
    p = positive_int("stages", stages)
    m = positive_int("micro_batches", micro_batches)
    return (p - 1) / (m + p - 1)


# ---------------------------------------------------------------------------- planning
def valid_tp_sizes(spec: ModelSpec, limit: int = 64) -> list[int]:
    """Degrees that split the heads and the KV heads evenly (KV heads may be replicated when
    t exceeds them, as vLLM does, so only the query heads must divide)."""
    return [t for t in range(1, limit + 1) if spec.num_heads % t == 0]


@dataclass(frozen=True)
class ParallelPlan:
    """The smallest layout whose per-GPU share of weights and KV cache fits."""

    model: str
    gpu: str
    tp: int
    pp: int
    ep: int
    gpus: int
    nodes: int
    per_gpu_bytes: float
    fits: bool
    why: str


def plan_parallel(
    spec: ModelSpec,
    gpu: str,
    bits: float | str = 16,
    context_len: int = 4096,
    batch: int = 16,
    kv_bytes_per_elem: float | str = 2,
    gpus_per_node: int = 8,
    utilization: float = 0.9,
    max_nodes: int = 64,
) -> ParallelPlan:
    """TP inside one node first (fast links), PP across nodes when one node is not enough, EP
    for an MoE model's experts; KV for ``batch`` sequences of ``context_len`` tokens."""
    g = get_gpu(gpu)
    per_node = positive_int("gpus_per_node", gpus_per_node)
    budget = g.memory_bytes * utilization
    weights = weights_bytes(spec.n_params, bits)
    kv = kv_cache_bytes(spec, context_len, batch, kv_bytes_per_elem)
    total = weights + kv
    ep_ok = spec.is_moe
    for tp in [t for t in valid_tp_sizes(spec, per_node) if t & (t - 1) == 0]:
        if total / tp <= budget:
            ep = tp if ep_ok and spec.num_experts % tp == 0 else 1
            why = "fits on one GPU" if tp == 1 else f"TP={tp} inside one node (NVLink)"
            if ep > 1:
                why += f", experts split EP={ep}"
            return ParallelPlan(spec.name, g.name, tp, 1, ep, tp, 1, total / tp, True, why)
    tp = max(t for t in valid_tp_sizes(spec, per_node) if t & (t - 1) == 0)
    for pp in range(2, max_nodes + 1):
        if spec.num_layers < pp:
            break
        if total / (tp * pp) <= budget:
            ep = tp * pp if ep_ok and spec.num_experts % (tp * pp) == 0 else 1
            why = f"TP={tp} in each node, PP={pp} stages across nodes"
            if ep > 1:
                why += f", experts split EP={ep}"
            gpus = tp * pp
            nodes = math.ceil(gpus / per_node)
            return ParallelPlan(spec.name, g.name, tp, pp, ep, gpus, nodes, total / gpus, True, why)
    return ParallelPlan(
        spec.name, g.name, tp, max_nodes, 1, tp * max_nodes, max_nodes, total / (tp * max_nodes),
        False, f"does not fit in {max_nodes} nodes",
    )  # fmt: skip
