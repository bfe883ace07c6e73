"""All-to-all token dispatch and combine for expert parallelism (Megatron's AlltoAll dispatcher).

N ranks hold E/N experts each, contiguous: rank r owns experts [r*E/N, (r+1)*E/N). Each rank
routed its own T_r tokens to k experts apiece, so it holds T_r*k (token, expert) pairs, and the
hidden vector of each pair must travel to the rank that owns the expert, and its output back:

    dispatch  1. sort the pairs by expert id: pairs for rank 0's experts first, then rank 1's...
              2. all-gather every rank's per-expert counts (N, E): now each rank knows how many
                 rows it sends to and receives from every peer, and per local expert
              3. all_to_all_single with those split sizes: the rows arrive grouped by source
                 rank, and inside each source by local expert
              4. regroup them by local expert (each expert then runs once, on one block)
    combine   the same steps backwards: ungroup, all_to_all_single with the splits swapped,
              unsort; the caller weights each pair's output and sums a token's k pairs.

Only hidden vectors travel (the router weights stay with the token's own rank, which applies
them after the combine). Every (token, expert) pair travels separately, so a token whose two
experts live on the same rank is sent twice (DeepEP-style kernels send it once). gloo
implements all_to_all_single with uneven split sizes on CPU, so this runs on plain torch.

Traffic is recorded in parallel/traffic.py as the bytes this rank sends to *other* ranks
("ep_dispatch", "ep_combine"; the rows a rank keeps for itself never leave it) and the
all-gathered counts ("ep_counts", the payload handed to the all-gather).
Shapes: T tokens of this rank, k experts per token, d model dim, E experts, N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from minillm.parallel import traffic


@dataclass
class Dispatched:
    """What a dispatch received, and what its combine needs to send the results back."""

    tokens: torch.Tensor  # (R, d): received rows, grouped by local expert (ascending)
    per_local_expert: list[int]  # rows of each local expert in `tokens`
    global_counts: torch.Tensor  # (N, E): pairs each rank's tokens sent to each expert
    order: torch.Tensor  # (T*k,): pair index of each sent row (pairs sorted by expert)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    regroup: torch.Tensor  # (R,): received row index of each row of `tokens`


def _remote_bytes(splits: list[int], rank: int, row_bytes: int) -> int:
    return (sum(splits) - splits[rank]) * row_bytes


def dispatch(
    h: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    group: Any = None,
) -> Dispatched:
    """Send each (token, expert) pair's hidden vector h (T, d) to its expert's rank.

    expert_ids (T, k) are global expert ids. Every rank of `group` must call this together."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    local_e = num_experts // n
    d = h.shape[1]
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # pair p = token p // k, its (p % k)-th choice
    order = torch.argsort(flat, stable=True)
    send = h[order // k].contiguous()  # (T*k, d), by expert, hence by destination rank
    # ---- who sends how much to whom: an all-gather of per-expert counts, (N, E)
    mine = torch.bincount(flat, minlength=num_experts).to(torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(n)]
    traffic.record("ep_counts", mine.numel() * mine.element_size())
    dist.all_gather(gathered, mine, group=group)
    global_counts = torch.stack(gathered)
    send_splits = mine.reshape(n, local_e).sum(dim=1).tolist()
    from_each = global_counts[:, rank * local_e : (rank + 1) * local_e]  # (N, E/N)
    recv_splits = from_each.sum(dim=1).tolist()
    # ---- the exchange itself
    recv = h.new_empty((sum(recv_splits), d))
    traffic.record("ep_dispatch", _remote_bytes(send_splits, rank, d * h.element_size()))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    # ---- rows arrived as [source][local expert]; regroup as [local expert][source]
    starts = torch.cumsum(from_each.reshape(-1), 0) - from_each.reshape(-1)
    starts, sizes = starts.reshape(n, local_e), from_each
    regroup = torch.cat(
        [
            torch.arange(int(starts[s, e]), int(starts[s, e] + sizes[s, e]))
            for e in range(local_e)
            for s in range(n)
        ]
        or [torch.zeros(0, dtype=torch.int64)]
    )
    return Dispatched(
        tokens=recv[regroup],
        per_local_expert=from_each.sum(dim=0).tolist(),
        global_counts=global_counts,
        order=order,
        send_splits=send_splits,
        recv_splits=recv_splits,
        regroup=regroup,
    )


def combine(outputs: torch.Tensor, sent: Dispatched, group: Any = None) -> torch.Tensor:
    """The experts' outputs (R, d), in `sent.tokens` order, back to the ranks that sent them.

    Returns (T*k, d): row p is pair p's output (token p // k, its (p % k)-th expert)."""
    rank = dist.get_rank(group)
    d = outputs.shape[1]
    back = torch.empty_like(outputs)
    back[sent.regroup] = outputs  # undo the regrouping: [source][local expert] again
    received = outputs.new_empty((sum(sent.send_splits), d))
    row_bytes = d * outputs.element_size()
    traffic.record("ep_combine", _remote_bytes(sent.recv_splits, rank, row_bytes))
    dist.all_to_all_single(received, back, sent.send_splits, sent.recv_splits, group=group)
    pairs = torch.empty_like(received)
    pairs[sent.order] = received  # undo the sort by expert
    return pairs
