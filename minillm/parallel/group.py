"""Process-group setup and teardown: gloo over a TCP store on the loopback interface.

Rank 0 opens the store on port 0, so the kernel picks a free port and no other process can take
it between choosing and binding (the race a "find a free port, then bind it" helper has); the
workers learn the port from their start-up arguments. The group's timeout bounds every
collective: a rank that waits longer on a peer gets a RuntimeError instead of hanging.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

HOST = "127.0.0.1"


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


def init_group(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the default (gloo) group; returns once every rank has joined."""
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: only one "
            "tensor-parallel LLM can run per process; close() the other one first"
        )
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def destroy_group() -> None:
    """Leave the default group, if this process is in one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
