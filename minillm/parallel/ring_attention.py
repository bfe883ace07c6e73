"""Ring attention: causal attention over a sequence split across ranks, K/V passed around a ring.

Each of N ranks holds the Q, K, V of its own tokens (after RoPE, so positions are global). In N
steps every K/V block visits every rank: at step s rank r holds the block of rank (r - s) mod N,
starts sending it to rank r + 1 and receiving the next one from rank r - 1 (point-to-point
isend/irecv, which gloo runs in the background), attends its local Q to the block it holds
while the bytes travel, then waits for the transfer. The causal mask is by global position.

Each step gives a partial result: the attention output over that block's keys alone and the
log-sum-exp (lse) of its scores. Partial results merge exactly, in any order, by the online
softmax: with lse_new = log(e^lse_a + e^lse_b),
    out = e^(lse_a - lse_new) · out_a + e^(lse_b - lse_new) · out_b
(ring-flash-attention's `update_out_and_lse` writes the same with sigmoid / logsigmoid).

Layouts (`SeqLayout`): "contiguous" gives rank r the r-th slice of the sequence. Causal
attention then makes rank N-1 attend to all N blocks while rank 0 attends to its own only: the
slowest rank does about 2N/(N+1) times the average work. "zigzag" (the default) cuts the
sequence into 2N chunks and gives rank r chunks r and 2N-1-r, one early and one late, so every
rank scores the same number of (query, key) pairs (ring-flash-attention's zigzag variant).
A block is attended piece by piece (one piece = one contiguous run of positions): a piece pair
whose keys all lie after its queries is skipped, one whose keys all lie before needs no mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minillm.parallel import traffic

LAYOUTS = ("zigzag", "contiguous")


def _split(length: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` near-equal runs covering 0..length (the first ones longer)."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class SeqLayout:
    """Which global positions of a `length`-token sequence each of `world_size` ranks holds."""

    length: int
    world_size: int
    kind: str = "zigzag"

    def __post_init__(self) -> None:
        if (
            isinstance(self.world_size, bool)
            or not isinstance(self.world_size, int)
            or self.world_size < 1
        ):
            raise ValueError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown layout {self.kind!r}: use one of {', '.join(LAYOUTS)}")
        if self.length < 1:
            raise ValueError("the sequence is empty: there is nothing to split over ranks")
        if self.length < self.world_size:
            raise ValueError(
                f"a {self.length}-token sequence cannot be split over {self.world_size} "
                f"context-parallel ranks: every rank needs at least one token; use "
                f"world_size <= {max(1, self.length)}"
            )

    def segments(self, rank: int) -> list[tuple[int, int]]:
        """rank's runs of positions, [start, stop), in the order its tokens are stored."""
        if self.kind == "contiguous":
            return [_split(self.length, self.world_size)[rank]]
        chunks = _split(self.length, 2 * self.world_size)
        pair = (chunks[rank], chunks[2 * self.world_size - 1 - rank])
        return [(a, b) for a, b in pair if b > a]  # a short sequence leaves late chunks empty

    def size(self, rank: int) -> int:
        return sum(b - a for a, b in self.segments(rank))

    def positions(self, rank: int) -> torch.Tensor:
        """(n,) int64 global positions of rank's tokens."""
        return torch.cat([torch.arange(a, b) for a, b in self.segments(rank)])

    def owner_of_last(self) -> tuple[int, int]:
        """(rank, local row) of the sequence's last token: the one whose logits are sampled."""
        for rank in range(self.world_size):
            hits = (self.positions(rank) == self.length - 1).nonzero()
            if len(hits):
                return rank, int(hits[0, 0])
        raise AssertionError("unreachable: the segments cover the sequence")


@dataclass
class RingStats:
    """What one rank's ring did, summed over calls (layers)."""

    bytes_sent: int = 0
    messages: int = 0
    compute_s: float = 0.0  # local attention math
    wait_s: float = 0.0  # waiting for a transfer after the local math was done
    scores: int = 0  # (query, key) scores computed: the causal work this rank did
    per_call_bytes: list[int] = field(default_factory=list)


def ring_bytes_per_layer(layout: SeqLayout, rank: int, kv_heads: int, head_dim: int) -> int:
    """Bytes rank sends per layer (fp32): every block but the last it receives, i.e. all
    blocks except that of rank + 1. With equal chunks of c tokens: (N-1) · 2 · c · KvH · D · 4."""
    n = layout.world_size
    if n == 1:
        return 0
    tokens = layout.length - layout.size((rank + 1) % n)
    return tokens * 2 * kv_heads * head_dim * 4


# ----------------------------------------------------------------------------- the math
def attend_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (n, H, D) over one block k/v (m, KvH, D) alone (GQA: each KV head serves
    H/KvH query heads); mask (n, m) True = may attend, None = all. Returns out (n, H, D) and
    lse (n, H); a row that sees no key gets out 0 and lse -inf, which merges as nothing."""
    n, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(n, kvh, h // kvh, d)
    scores = torch.einsum("nkgd,mkd->kgnm", qg, k) * scale  # (KvH, G, n, m)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (KvH, G, n)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])  # rows that see nothing: exp(-inf) = 0
    out = torch.einsum("kgnm,mkd->nkgd", probs, v).reshape(n, h, d)
    return out, lse.permute(2, 0, 1).reshape(n, h)


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets (exact)."""
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # both empty: weights 0
    merged = (
        out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
    )
    return merged, new


def attend_pieces(
    q: torch.Tensor,
    q_segments: list[tuple[int, int]],
    kv: torch.Tensor,
    k_segments: list[tuple[int, int]],
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    stats: RingStats,
) -> None:
    """Merge the attention of every local query piece over every piece of one K/V block."""
    q_row = 0
    for qa, qb in q_segments:
        rows = slice(q_row, q_row + qb - qa)
        q_row += qb - qa
        k_row = 0
        for ka, kb in k_segments:
            cols = slice(k_row, k_row + kb - ka)
            k_row += kb - ka
            if ka >= qb:  # every key after every query: nothing to see
                continue
            mask = None
            if kb - 1 > qa:  # keys and queries overlap (the diagonal piece): causal mask
                mask = torch.arange(ka, kb)[None, :] <= torch.arange(qa, qb)[:, None]
            o, s = attend_block(q[rows], kv[0, cols], kv[1, cols], scale, mask)
            out[rows], lse[rows] = merge_partials(out[rows], lse[rows], o, s)
            stats.scores += (qb - qa) * (kb - ka) * q.shape[1]


# ----------------------------------------------------------------------------- the ring
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SeqLayout,
    rank: int,
    scale: float,
    stats: RingStats | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's q (n, H, D) over the whole sequence's keys.

    k, v (n, KvH, D) are this rank's own keys and values; the other ranks' arrive through the
    ring (the default process group; nothing is sent when world_size is 1). Every rank must
    call this with the same layout, once per layer, in the same order."""
    stats = stats if stats is not None else RingStats()
    world = layout.world_size
    n, h, d = q.shape
    if n != layout.size(rank) or k.shape[0] != n or v.shape != k.shape:
        raise ValueError(
            f"rank {rank} holds {layout.size(rank)} tokens, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if h % k.shape[1]:
        raise ValueError(f"{h} query heads do not group over {k.shape[1]} KV heads")
    out = torch.zeros(n, h, d, dtype=torch.float32)
    lse = torch.full((n, h), float("-inf"), dtype=torch.float32)
    kv = torch.stack((k, v)).float().contiguous()  # one message per step: (2, m, KvH, D)
    sent = 0
    for step in range(world):
        src = (rank - step) % world  # whose block this rank holds now
        reqs = []
        if step + 1 < world:  # pass it on while computing with it
            nxt = torch.empty((2, layout.size((src - 1) % world), *kv.shape[2:]))
            reqs = [dist.isend(kv, (rank + 1) % world), dist.irecv(nxt, (rank - 1) % world)]
            sent += kv.numel() * kv.element_size()
            traffic.record("cp_ring", kv.numel() * kv.element_size())
            stats.messages += 1
        t0 = time.perf_counter()
        attend_pieces(q, layout.segments(rank), kv, layout.segments(src), scale, out, lse, stats)
        t1 = time.perf_counter()
        for req in reqs:
            req.wait()
        stats.compute_s += t1 - t0
        stats.wait_s += time.perf_counter() - t1
        if reqs:
            kv = nxt
    stats.bytes_sent += sent
    stats.per_call_bytes.append(sent)
    return out
