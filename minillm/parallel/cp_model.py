"""The Llama forward on one context-parallel rank: the same code, ring attention for attention.

Every rank holds all the weights and runs LlamaModel's layers (embedding, norms, projections,
RoPE at the tokens' global positions, MLP) on its own tokens only; those steps are per token and
need no other rank. Attention is the one step that mixes tokens: `_attention` is overridden to
read this rank's fresh K/V back from its cache and run ring attention over all ranks' K/V.
After the forward, rank 0 collects the last token's logits and every rank's K/V (point-to-point
sends), so decode can go on in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.distributed as dist

from minillm.config import ModelConfig
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.llama import LlamaModel
from minillm.model.weights import ModelWeights
from minillm.parallel import traffic
from minillm.parallel.ring_attention import RingStats, SeqLayout, ring_attention


class ContextParallelLlama(LlamaModel):
    """A full (replicated) model that attends through the ring: `layout` says which tokens are
    whose; `stats` sums what the ring did over the layers."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, ops: ModuleType, rank: int
    ) -> None:
        super().__init__(config, weights, ops)
        self.rank = rank
        self.layout: SeqLayout | None = None
        self.stats = RingStats()
        self.fused_decode = False  # a fused decode call would bypass `_attention`
        self.use_resident = False  # and so would a resident forward

    def _attention(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        if self.layout is None:  # not inside a CP prefill (a decode step after it): one process
            return super()._attention(q, kc, vc, batch)
        cfg = self.config
        k = kc.reshape(-1, cfg.num_kv_heads, cfg.head_dim)[batch.slot_mapping]
        v = vc.reshape(-1, cfg.num_kv_heads, cfg.head_dim)[batch.slot_mapping]
        return ring_attention(q, k, v, self.layout, self.rank, self.scale, self.stats)


@dataclass
class RankReport:
    """One rank's share of a context-parallel prefill (times in seconds)."""

    rank: int
    tokens: int
    forward_s: float = 0.0  # the whole forward on this rank
    attention_s: float = 0.0  # ring attention's local math
    ring_wait_s: float = 0.0  # waiting on K/V transfers not hidden behind that math
    collect_s: float = 0.0  # sending logits and K/V to rank 0 (receiving, on rank 0)
    ring_bytes: int = 0  # K/V sent around the ring, all layers
    collect_bytes: int = 0  # logits and K/V sent to rank 0
    scores: int = 0  # (query, key, head) scores computed: the causal work
    ring_bytes_per_layer: list[int] = field(default_factory=list)
    traffic: dict[str, int] = field(default_factory=dict)  # traffic.py's counts, this prefill

    @property
    def other_compute_s(self) -> float:
        """Embedding, norms, projections, MLP: the per-token work."""
        return self.forward_s - self.attention_s - self.ring_wait_s


@dataclass
class RankOutput:
    logits: torch.Tensor | None  # (V,) on rank 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # rank 0: per layer (T, KvH, D) each
    report: RankReport


def local_batch(layout: SeqLayout, rank: int, prompt_ids: list[int]) -> ForwardBatch:
    """rank's tokens as one prefill chunk at their global positions, stored in slots 0..n-1 of
    a one-block cache; the logits row is set only on the rank that holds the last token."""
    pos = layout.positions(rank)
    n = int(pos.shape[0])
    owner, row = layout.owner_of_last()
    return ForwardBatch(
        token_ids=torch.tensor(prompt_ids, dtype=torch.int64)[pos],
        positions=pos,
        slot_mapping=torch.arange(n),
        num_decode=0,
        decode_block_tables=torch.zeros((0, 1), dtype=torch.int64),
        decode_context_lens=torch.zeros(0, dtype=torch.int64),
        prefills=[PrefillChunk(0, n, n, torch.zeros(1, dtype=torch.int64))],
        logits_rows=torch.tensor([row] if rank == owner else [], dtype=torch.int64),
    )


def _send(t: torch.Tensor, report: RankReport) -> None:
    dist.send(t, 0)
    report.collect_bytes += t.numel() * t.element_size()
    traffic.record("cp_collect", t.numel() * t.element_size())


def run_rank(model: ContextParallelLlama, layout: SeqLayout, prompt_ids: list[int]) -> RankOutput:
    """This rank's part of a context-parallel prefill; every rank calls it together."""
    cfg, ops, rank = model.config, model.ops, model.rank
    batch = local_batch(layout, rank, prompt_ids)
    n = batch.num_tokens
    shape = (1, n, cfg.num_kv_heads, cfg.head_dim)  # one block holds all of this rank's tokens
    k_caches = [ops.allocate_kv_cache(shape) for _ in range(cfg.num_layers)]
    v_caches = [ops.allocate_kv_cache(shape) for _ in range(cfg.num_layers)]
    model.layout, model.stats = layout, RingStats()
    before = traffic.snapshot()  # the counter is per process and may hold others' counts
    t0 = time.perf_counter()
    try:
        logits = model.forward(batch, k_caches, v_caches)
    finally:
        model.layout = None
    t1 = time.perf_counter()
    stats = model.stats
    report = RankReport(
        rank, n, t1 - t0, stats.compute_s, stats.wait_s, 0.0, stats.bytes_sent, 0,
        stats.scores, stats.per_call_bytes,
    )  # fmt: skip
    # ---- collect on rank 0: the last token's logits and every rank's K/V, in global order
    local_kv = torch.stack(
        [torch.stack((k[0], v[0])) for k, v in zip(k_caches, v_caches, strict=True)]
    )
    local_kv = local_kv.float().contiguous()  # (L, 2, n, KvH, D)
    owner, _ = layout.owner_of_last()
    out_logits, out_kv = None, None
    world = layout.world_size
    if rank == 0:
        full = torch.empty((cfg.num_layers, 2, layout.length, cfg.num_kv_heads, cfg.head_dim))
        full[:, :, layout.positions(0)] = local_kv
        for src in range(1, world):
            part = torch.empty((cfg.num_layers, 2, layout.size(src), *local_kv.shape[3:]))
            dist.recv(part, src)
            full[:, :, layout.positions(src)] = part
        out_logits = logits[0].float() if owner == 0 else torch.empty(cfg.vocab_size)
        if owner != 0:
            dist.recv(out_logits, owner)
        out_kv = [(full[i, 0], full[i, 1]) for i in range(cfg.num_layers)]
    else:
        _send(local_kv, report)
        if rank == owner:
            _send(logits[0].float().contiguous(), report)
    report.collect_s = time.perf_counter() - t1
    after = traffic.snapshot()
    report.traffic = {
        kind: c["bytes"] - before.get(kind, {"bytes": 0})["bytes"] for kind, c in after.items()
    }
    return RankOutput(out_logits, out_kv, report)
