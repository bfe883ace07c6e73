"""Rank 0's side of a tensor-parallel run: start the workers, watch them, shut them down.

Start-up: rank 0 loads its own shard first (a size that does not divide the model fails there,
before any process exists), opens the group's store, spawns ranks 1..N-1 ('spawn', never fork:
torch and Numba state must not be copied), waits until each has loaded its shard, and only then
joins the group, so a worker that fails to load is reported at once with its traceback instead
of leaving the others waiting in the rendezvous.

A dead worker never becomes a hang. Before each step rank 0 checks that every worker process is
alive; a worker that dies during a step closes its sockets, so rank 0's pending collective fails
at once (and the group's timeout bounds any other wait). Either way rank 0 raises RuntimeError
naming the rank, its pid and how it ended, kills the remaining workers and leaves the group.
Workers exit when rank 0's pipe closes, so none outlives the parent; `shutdown` (called by
LLM.close, by garbage collection and at interpreter exit) stops them in order.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minillm.kernels import resolve_backend_name
from minillm.loader import LoadedModel, load_model
from minillm.model.batch import ForwardBatch
from minillm.model.llama import LlamaModel
from minillm.parallel.group import destroy_group, init_group, open_store
from minillm.parallel.runner import TensorParallelRunner
from minillm.parallel.tp_model import ShardedLlamaModel
from minillm.parallel.worker import worker_main

if TYPE_CHECKING:
    from minillm.engine.llm_engine import LLMEngine
    from minillm.kv.cache import KVCache

DEFAULT_TIMEOUT_S = 120.0  # one collective (or the rendezvous) may wait this long on a peer
TIMEOUT_ENV = "MINILLM_TP_TIMEOUT_S"
LOAD_TIMEOUT_S = 900.0  # a worker that neither loads nor dies within this is reported stuck
STOP_GRACE_S = 30.0  # how long an idle worker gets to leave the group before it is killed


def distributed_timeout_s() -> float:
    """The collectives' timeout: $MINILLM_TP_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGKILL (exit code -9)', 'exited with exit code 1', ..."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            how = signal.Signals(-exitcode).name
        except ValueError:
            how = f"signal {-exitcode}"
        return f"was killed by {how} (exit code {exitcode})"
    return f"exited with exit code {exitcode}"


def _recv(conn: Connection) -> tuple[str, Any]:
    """One message from a worker; ("eof", None) when its end of the pipe is closed."""
    try:
        return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return ("eof", None)


class TensorParallelExecutor:
    """The worker processes (ranks 1..N-1) of one tensor-parallel LLM, seen from rank 0."""

    def __init__(self, world_size: int, timeout_s: float) -> None:
        self.world_size, self.timeout_s = world_size, timeout_s
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self._store: Any = None
        self._failure: str | None = None
        self._closed = False

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    # ------------------------------------------------------------------ start-up
    def start(self, path: Path, backend: str) -> None:
        """Spawn ranks 1..N-1, wait until each has its shard, then form the group."""
        try:
            self._store = open_store(self.world_size, self.timeout_s)
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world_size):
                parent, child = ctx.Pipe()
                args = (rank, self.world_size, str(path), backend, self._store.port, child)
                proc = ctx.Process(
                    target=worker_main,
                    args=(*args, self.timeout_s),
                    name=f"minillm-tp-rank{rank}",
                    daemon=True,  # multiprocessing also terminates it at interpreter exit
                )
                proc.start()
                child.close()  # the worker's end lives in the worker only: EOF when it dies
                self.procs.append(proc)
                self.conns.append(parent)
            self._wait_loaded()
            init_group(self._store, 0, self.world_size, self.timeout_s)
        except BaseException:
            self._failure = self._failure or "the tensor-parallel start-up failed"
            self.shutdown()
            raise

    def _wait_loaded(self) -> None:
        pending = {conn: rank for rank, conn in enumerate(self.conns, start=1)}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while pending:
            sentinels = [p.sentinel for p in self.procs]
            ready = wait([*pending, *sentinels], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = ", ".join(str(r) for r in pending.values())
                raise RuntimeError(
                    f"tensor-parallel worker rank(s) {ranks} did not load within "
                    f"{LOAD_TIMEOUT_S:.0f} s"
                )
            for conn in [c for c in ready if c in pending]:
                kind, detail = _recv(conn)
                rank = pending.pop(conn)
                if kind == "error":
                    raise RuntimeError(
                        f"tensor-parallel worker rank {rank} failed while loading its "
                        f"shard:\n{detail}"
                    )
                if kind != "loaded":  # "eof": it died without a word
                    raise RuntimeError(self._death_message())
            if any(s in ready for s in sentinels) and self._dead_workers():
                raise RuntimeError(self._death_message())

    def attach(self, engine: LLMEngine) -> None:
        """Give every worker a KV cache of rank 0's size; route the engine's steps to them."""
        kv = engine.kv_cache
        self._send(("kv", kv.num_blocks, kv.block_size))
        engine.runner = TensorParallelRunner(engine.model, kv, self)

    # ------------------------------------------------------------------ steps
    def run_step(
        self,
        blocks_to_copy: list[tuple[int, int]],
        batch: ForwardBatch,
        model: LlamaModel,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """Send the step to every worker, run rank 0's shard; (S, V) logits."""
        self._send(("step", blocks_to_copy, batch))
        try:
            kv_cache.copy_blocks(blocks_to_copy)
            return model.forward(batch, kv_cache.k, kv_cache.v)
        except Exception as e:  # a collective failed: find out who is to blame
            raise self._fail(e) from e
        except BaseException:  # Ctrl-C between two collectives: the ranks are out of step
            self._failure = "a tensor-parallel step was interrupted; create a new LLM"
            self.shutdown()
            raise

    def _send(self, msg: tuple) -> None:
        self._check_running()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:  # a broken pipe: that worker is gone
            raise self._fail(e) from e

    def _check_running(self) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if self._closed:
            raise RuntimeError("this LLM was closed; its tensor-parallel workers are gone")
        if self._dead_workers():
            raise self._fail(None)

    # ------------------------------------------------------------------ failures
    def _dead_workers(self) -> list[tuple[int, BaseProcess]]:
        return [(r, p) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]

    def _death_message(self) -> str:
        parts = []
        for rank, proc in self._dead_workers():
            parts.append(
                f"tensor-parallel worker rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
            )
            kind, detail = _recv(self.conns[rank - 1]) if self.conns[rank - 1].poll() else ("", "")
            if kind == "error":
                parts.append(f"rank {rank} reported:\n{str(detail).rstrip()}")
            elif proc.exitcode == 1:  # it died before worker_main could report anything
                parts.append(
                    "its traceback is on stderr; note that workers are spawned and import the "
                    "main module again, so a script must create the LLM under "
                    "`if __name__ == '__main__':`"
                )
        return "\n".join(parts) or "a tensor-parallel worker died"

    def _fail(self, cause: BaseException | None) -> RuntimeError:
        """Name the dead worker (give it a moment to be seen dead), then stop the rest."""
        if not self._dead_workers():
            ready = wait([p.sentinel for p in self.procs], timeout=min(10.0, self.timeout_s))
            for proc in self.procs:  # its sentinel closes a moment before it can be reaped
                if proc.sentinel in ready:
                    proc.join(10.0)
        if self._dead_workers():
            message = self._death_message()
        else:
            message = f"a tensor-parallel step failed although every worker is alive: {cause}"
        self._failure = message + "\nthe tensor-parallel run cannot continue; create a new LLM"
        self.shutdown()
        return RuntimeError(self._failure)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the workers (asked to, then killed), join them, leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:  # idle workers leave on "stop"; after a failure, kill
            stop = pickle.dumps(("stop",))
            for conn in self.conns:
                try:
                    conn.send_bytes(stop)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
        for conn in self.conns:
            conn.close()
        destroy_group()
        self._store = None


def start_tensor_parallel(
    model: str, backend: str, world_size: int
) -> tuple[LoadedModel, TensorParallelExecutor]:
    """Load rank 0's shard and start ranks 1..N-1 (a bad size fails before any spawn)."""
    name = "ref" if backend == "auto" else resolve_backend_name(backend)
    if name != "ref":
        raise ValueError(
            f"tensor_parallel_size > 1 runs on the 'ref' backend only for now, got "
            f"backend={backend!r}; use backend='ref' (or 'auto')"
        )
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; use tensor_parallel_size=1")
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: only one "
            "tensor-parallel LLM can run per process; close() the other one first"
        )
    timeout_s = distributed_timeout_s()
    build = functools.partial(ShardedLlamaModel.from_full, rank=0, world_size=world_size)
    loaded = load_model(model, name, build=build)
    loaded.weights = loaded.model.shard  # rank 0 keeps its shards only
    executor = TensorParallelExecutor(world_size, timeout_s)
    executor.start(loaded.path, name)
    return loaded, executor
