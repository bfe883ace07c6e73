"""Process groups: gloo over a TCP store on the loopback interface, or torchrun's env://.

Rank 0 opens the store on port 0, so the kernel picks a free port and no other process can take
it between choosing and binding (the race a "find a free port, then bind it" helper has); the
workers learn the port from their start-up arguments. Under torchrun the group comes from its
rendezvous instead (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE: `init_from_env`). The group's
timeout bounds every collective: a rank that waits longer on a peer gets a RuntimeError instead
of hanging.

`make_subgroups` then creates, in the same order on every rank (torch requires it), one TP
group per pipeline stage (when there are several stages; with one stage TP uses the default
group) and, under torchrun, the control group that carries rank 0's commands: its timeout is
long because an idle server's workers wait on it for as long as no request comes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from minillm.parallel.config import ParallelConfig

HOST = "127.0.0.1"
IDLE_TIMEOUT = timedelta(days=365)  # the control group: workers wait there while idle


def process_group_backend(backend: str) -> str:
    """gloo, for every minillm backend: between ops they all hand over host torch tensors (the
    cuda backend's kernels copy their results back to the host), and gloo reduces and sends
    host tensors. NCCL needs the tensors on the GPU; it becomes the choice once the cuda
    backend keeps activations on the device."""
    del backend  # the same answer for ref, cpu and cuda today
    return "gloo"


def open_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store, listening on a free loopback port (store.port)."""
    return dist.TCPStore(
        HOST,
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def connect_store(port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore(
        HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s)
    )


def _refuse_second_group() -> None:
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: only one "
            "parallel LLM can run per process; close() the other one first"
        )


def init_group(
    store: dist.Store, rank: int, world_size: int, timeout_s: float, backend: str = "gloo"
) -> None:
    """Join the default group; returns once every rank has joined."""
    _refuse_second_group()
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def init_from_env(timeout_s: float, backend: str = "gloo") -> tuple[int, int]:
    """Join torchrun's group (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); (rank, size)."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: start this under torchrun (see README, "
            "'Multi-node with torchrun')"
        )
    _refuse_second_group()
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Subgroups:
    tp: Any  # this rank's stage's TP group; None: the default group
    control: Any  # rank 0's command channel under torchrun; None when commands use pipes


def make_subgroups(parallel: ParallelConfig, rank: int, control: bool) -> Subgroups:
    """Create every subgroup (same order on every rank) and return this rank's."""
    tp_size, pp_size = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if control else None
    tp_group = None
    if pp_size > 1 and tp_size > 1:
        for stage in range(pp_size):
            ranks = [parallel.rank_of(stage, t) for t in range(tp_size)]
            group = dist.new_group(ranks)
            if rank in ranks:
                tp_group = group
    return Subgroups(tp_group, ctrl)


def destroy_group() -> None:
    """Leave the default group (and every subgroup), if this process is in one (safe twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
