"""The loop a worker (rank >= 1) runs: receive rank 0's commands, run its part of each step.

Commands come from rank 0 over a multiprocessing pipe when minillm spawned the worker, or over
a broadcast on the control group when torchrun started it (launch.py); either way a worker
waits on them for as long as the LLM sits idle, and sees rank 0 go away (the pipe's end, or the
control group's sockets closing), so it exits instead of outliving rank 0. The forward pass
itself uses collectives and point-to-point sends (tp_model.py, pipeline.py). Pipe messages are
pickled by hand (send_bytes): torch.multiprocessing's pickler would move every tensor to shared
memory.

Commands: ("kv", num_blocks, block_size) allocates this rank's KV cache (its stage's layers,
its own KV heads; the block ids are rank 0's, so every rank's cache has the same number of
blocks); ("step", blocks_to_copy, [ForwardBatch, ...]) runs one step, one ForwardBatch per
micro-batch; ("hidden", ForwardBatch, num_blocks, block_size) runs an embeddings pass on a
scratch cache of that many blocks; ("stats",) and ("traffic",) answer with this rank's step timings or traffic counts
(a gather on the control group); ("reset",) clears both; ("stop",) ends the loop.
"""

from __future__ import annotations

import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from minillm.parallel.config import ParallelConfig
from minillm.parallel.cores import share_cores

Command = tuple[Any, ...]


def build_model(path: Path, backend: str, rank: int, parallel: ParallelConfig) -> tuple:
    """(ops, this rank's ShardedLlamaModel); the full weights are dropped once cut."""
    from minillm.kernels import activations_mode, get_backend
    from minillm.loader import read_model_files
    from minillm.parallel.tp_model import ShardedLlamaModel

    ops = get_backend(backend)
    config, weights, _ = read_model_files(path)
    with activations_mode(ops, parallel.activations):  # as rank 0 prepared its part
        return ops, ShardedLlamaModel(config, weights, ops, rank, parallel)


def serve_commands(
    model: Any, ops: ModuleType, recv: Callable[[], Command | None], control: Any
) -> None:
    """Run rank 0's commands until "stop" or until rank 0 is gone (recv returns None)."""
    import torch.distributed as dist

    from minillm.kv.cache import KVCache, host_kv_cache
    from minillm.parallel import traffic
    from minillm.parallel.pipeline import StepTimes, run_stage

    cfg, kv, times = model.config, None, StepTimes()
    while True:
        msg = recv()
        if msg is None or msg[0] == "stop":
            return
        kind = msg[0]
        if kind == "kv":
            _, num_blocks, block_size = msg
            kv = KVCache(
                cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, ops
            )
        elif kind == "step":
            _, blocks_to_copy, batches = msg
            if kv is None:
                raise RuntimeError("a step arrived before the KV cache was allocated")
            kv.copy_blocks(blocks_to_copy)
            run_stage(model, kv, batches, times)
        elif kind == "hidden":  # an embeddings pass, on a scratch cache of its own
            _, batch, num_blocks, block_size = msg
            shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
            allocate = getattr(ops, "allocate_kv_cache", host_kv_cache)
            k, v = allocate(shape), allocate(shape)
            layers = cfg.num_layers
            run_stage(
                model,
                SimpleNamespace(k=[k] * layers, v=[v] * layers),
                [batch],
                StepTimes(),
                hidden=True,
            )
        elif kind == "stats":
            dist.gather_object(times.as_dict(), None, dst=0, group=control)
        elif kind == "traffic":
            dist.gather_object(traffic.snapshot(), None, dst=0, group=control)
        elif kind == "reset":
            times.clear()
            traffic.reset()
        else:
            raise RuntimeError(f"unknown command {kind!r}")


def worker_main(
    rank: int,
    parallel: ParallelConfig,
    path: str,
    backend: str,
    port: int,
    conn: Connection,
    timeout_s: float,
) -> None:
    """A spawned worker: load rank's part, report ("loaded", None), join the group, serve."""
    from minillm.parallel.group import (
        connect_store,
        destroy_group,
        init_group,
        make_subgroups,
        process_group_backend,
    )

    # Ctrl-C reaches the whole process group; rank 0 decides what it means (LLM.generate
    # aborts its requests between steps), so a worker must not die of it mid-collective
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0

    def recv() -> Command | None:
        try:
            return pickle.loads(conn.recv_bytes())
        except EOFError:  # rank 0 is gone: nothing left to serve
            return None

    try:
        share_cores(parallel.world_size, backend)
        ops, model = build_model(Path(path), backend, rank, parallel)
        conn.send_bytes(pickle.dumps(("loaded", None)))
        store = connect_store(port, parallel.world_size, timeout_s)
        init_group(store, rank, parallel.world_size, timeout_s, process_group_backend(backend))
        groups = make_subgroups(parallel, rank, control=True)
        model.tp_group = groups.tp
        serve_commands(model, ops, recv, groups.control)
    except BaseException:  # tell rank 0 why, then exit non-zero
        code = 1
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        except OSError:
            pass
    finally:
        try:
            destroy_group()
        finally:
            conn.close()
    sys.exit(code)
