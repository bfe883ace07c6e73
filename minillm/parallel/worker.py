"""The loop a tensor-parallel worker (rank >= 1) runs in its own process.

Commands come from rank 0 over a multiprocessing pipe, not a collective: a worker waits on the
pipe for as long as the LLM sits idle (a collective would time out), and it sees the end of the
pipe at once when rank 0 goes away, so it exits instead of outliving its parent. Only the
forward pass itself uses collectives (tp_model.py). Messages are pickled by hand
(send_bytes): torch.multiprocessing's pickler would move every tensor to shared memory.

Messages: ("kv", num_blocks, block_size) allocates this rank's KV cache (its own KV heads; the
block ids are rank 0's, so every rank's cache has the same number of blocks);
("step", blocks_to_copy, ForwardBatch) runs one forward pass; ("stop",) ends the loop.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path


def worker_main(
    rank: int,
    world_size: int,
    path: str,
    backend: str,
    port: int,
    conn: Connection,
    timeout_s: float,
) -> None:
    """Load rank's shard, report ("loaded", None), join the group, then serve steps."""
    import torch

    from minillm.kernels import get_backend
    from minillm.kv.cache import KVCache
    from minillm.loader import read_model_files
    from minillm.parallel.group import connect_store, destroy_group, init_group
    from minillm.parallel.tp_model import ShardedLlamaModel

    # Ctrl-C reaches the whole process group; rank 0 decides what it means (LLM.generate
    # aborts its requests between steps), so a worker must not die of it mid-collective
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    try:
        # N processes share the cores; rank 0 (the caller's process) is left as it was
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        ops = get_backend(backend)
        config, weights, _ = read_model_files(Path(path))
        model = ShardedLlamaModel.from_full(config, weights, ops, rank, world_size)
        del weights  # only the shards stay
        conn.send_bytes(pickle.dumps(("loaded", None)))
        init_group(connect_store(port, world_size, timeout_s), rank, world_size, timeout_s)
        cfg, kv = model.config, None
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except EOFError:  # rank 0 is gone: nothing left to serve
                break
            if msg[0] == "stop":
                break
            if msg[0] == "kv":
                _, num_blocks, block_size = msg
                kv = KVCache(
                    cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, ops
                )
            elif msg[0] == "step":
                _, blocks_to_copy, batch = msg
                if kv is None:
                    raise RuntimeError("a step arrived before the KV cache was allocated")
                kv.copy_blocks(blocks_to_copy)
                model.forward(batch, kv.k, kv.v)
            else:
                raise RuntimeError(f"unknown command {msg[0]!r}")
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
