"""Rank 0's side of a parallel run: start the workers, send them each step, shut them down.

Start-up (`start_parallel`): rank 0 loads its own part first (a size that does not divide the
model fails there, before any process exists), opens the group's store, spawns ranks 1..N-1
('spawn', never fork: torch and Numba state must not be copied), waits until each has loaded
its part, and only then joins the group, so a worker that fails to load is reported at once
with its traceback instead of leaving the others waiting in the rendezvous. Under torchrun the
workers already exist (launch.py) and the group is torchrun's; rank 0 then sends its commands
over the control group instead of pipes.

A dead worker never becomes a hang. Before each step rank 0 checks that every worker process it
spawned is alive; a worker that dies during a step closes its sockets, so rank 0's pending
collective fails at once (and the group's timeout bounds any other wait). Either way rank 0
raises RuntimeError naming the rank, its pid and how it ended, kills the remaining workers,
leaves the group and calls the `on_failure` hooks (the server uses one to exit). Workers exit
when rank 0's pipe closes, so none outlives the parent; `shutdown` (called by LLM.close, by
garbage collection and at interpreter exit) stops them in order.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from minillm.kernels import resolve_backend_name
from minillm.loader import LoadedModel, load_model
from minillm.model.batch import ForwardBatch
from minillm.parallel import traffic
from minillm.parallel.config import ParallelConfig
from minillm.parallel.cores import share_cores, worker_environment
from minillm.parallel.group import (
    destroy_group,
    init_group,
    make_subgroups,
    open_store,
    process_group_backend,
)
from minillm.parallel.pipeline import StepTimes, bubble_formula, run_stage
from minillm.parallel.runner import ParallelRunner
from minillm.parallel.tp_model import ShardedLlamaModel
from minillm.parallel.worker import worker_main

if TYPE_CHECKING:
    from minillm.engine.llm_engine import LLMEngine
    from minillm.kv.cache import KVCache

DEFAULT_TIMEOUT_S = 120.0  # one collective (or the rendezvous) may wait this long on a peer
TIMEOUT_ENV = "MINILLM_TP_TIMEOUT_S"
LOAD_TIMEOUT_S = 900.0  # a worker that neither loads nor dies within this is reported stuck
STOP_GRACE_S = 30.0  # how long an idle worker gets to leave the group before it is killed

_torchrun: dict[str, Any] = {}  # set by launch.py on rank 0: the group exists already


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


class ParallelExecutor:
    """The workers (ranks 1..N-1) of one parallel LLM, seen from rank 0."""

    def __init__(self, parallel: ParallelConfig, timeout_s: float) -> None:
        self.parallel, self.timeout_s = parallel, timeout_s
        self.world_size = parallel.world_size
        self.num_micro_batches = parallel.micro_batches
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.control: Any = None  # the control group (replies; torchrun: commands too)
        self.torchrun = False
        self.times = StepTimes()
        self.on_failure: list[Callable[[str], None]] = []
        self._store: Any = None
        self._failure: str | None = None
        self._closed = False
        self._restore_cores: Callable[[], None] = lambda: None  # set once workers exist

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    @property
    def failure(self) -> str | None:
        """Why this run stopped, once a worker failed (None while it is healthy)."""
        return self._failure

    @property
    def closed(self) -> bool:
        return self._closed

    def mark_failed(self, reason: str) -> None:
        """Record a failure seen outside a step (a watcher saw a worker die): the next step
        raises it, and shutdown kills instead of asking politely."""
        if self._failure is None:
            self._failure = reason + "\nthe parallel run cannot continue; create a new LLM"

    # ------------------------------------------------------------------ start-up
    def start(self, path: Path, backend: str, model: ShardedLlamaModel) -> None:
        """Spawn ranks 1..N-1, wait until each has its part, then form the groups."""
        try:
            self._store = open_store(self.world_size, self.timeout_s)
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world_size):
                parent, child = ctx.Pipe()
                args = (rank, self.parallel, str(path), backend, self._store.port, child)
                proc = ctx.Process(
                    target=worker_main,
                    args=(*args, self.timeout_s),
                    name=f"minillm-parallel-rank{rank}",
                    daemon=True,  # multiprocessing also terminates it at interpreter exit
                )
                with worker_environment():  # idle thread pools sleep, see cores.py
                    proc.start()
                child.close()  # the worker's end lives in the worker only: EOF when it dies
                self.procs.append(proc)
                self.conns.append(parent)
            self._wait_loaded()
            # rank 0 takes its share of the cores while the workers live (see cores.py)
            self._restore_cores = share_cores(self.world_size, backend)
            group_backend = process_group_backend(backend)
            init_group(self._store, 0, self.world_size, self.timeout_s, group_backend)
            self._join_subgroups(model)
        except BaseException:
            self._failure = self._failure or "the parallel start-up failed"
            self.shutdown()
            raise

    def start_torchrun(self, model: ShardedLlamaModel) -> None:
        """torchrun started the workers and the group: check they loaded, form subgroups."""
        self.torchrun = True
        try:
            self._join_subgroups(model)
            reports: list[Any] = [None] * self.world_size
            dist.gather_object(None, reports, dst=0, group=self.control)
            errors = [f"rank {r}:\n{e}" for r, e in enumerate(reports) if e]
            if errors:
                raise RuntimeError("torchrun workers failed to load:\n" + "\n".join(errors))
        except BaseException:
            self._failure = self._failure or "the parallel start-up failed"
            self.shutdown()
            raise

    def _join_subgroups(self, model: ShardedLlamaModel) -> None:
        groups = make_subgroups(self.parallel, 0, control=True)
        model.tp_group, self.control = groups.tp, groups.control

    def _wait_loaded(self) -> None:
        pending = {conn: rank for rank, conn in enumerate(self.conns, start=1)}
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while pending:
            sentinels = [p.sentinel for p in self.procs]
            ready = wait([*pending, *sentinels], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = ", ".join(str(r) for r in pending.values())
                raise RuntimeError(
                    f"parallel worker rank(s) {ranks} did not load within {LOAD_TIMEOUT_S:.0f} s"
                )
            for conn in [c for c in ready if c in pending]:
                kind, detail = _recv(conn)
                rank = pending.pop(conn)
                if kind == "error":
                    raise RuntimeError(
                        f"parallel worker rank {rank} failed while loading its part of the "
                        f"model:\n{detail}"
                    )
                if kind != "loaded":  # "eof": it died without a word
                    raise RuntimeError(self._death_message())
            if any(s in ready for s in sentinels) and self._dead_workers():
                raise RuntimeError(self._death_message())

    def attach(self, engine: LLMEngine) -> None:
        """Give every worker a KV cache of rank 0's size; route the engine's steps to them."""
        kv = engine.kv_cache
        self._send(("kv", kv.num_blocks, kv.block_size))
        engine.runner = ParallelRunner(engine.model, kv, self)
        engine.model.remote_hidden = functools.partial(self.run_hidden, engine.model)

    def run_hidden(
        self,
        model: ShardedLlamaModel,
        batch: ForwardBatch,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """An embeddings pass on every rank (model/pooling.py's scratch cache on rank 0, one
        of the same number of blocks on each worker); the final hidden states (T, d)."""
        num_blocks, block_size = (int(n) for n in k_caches[0].shape[:2])
        self._send(("hidden", batch, num_blocks, block_size))
        scratch = SimpleNamespace(k=k_caches, v=v_caches)
        try:
            return run_stage(model, scratch, [batch], StepTimes(), hidden=True)[0]
        except Exception as e:
            raise self._fail(e) from e

    # ------------------------------------------------------------------ steps
    def run_step(
        self,
        blocks_to_copy: list[tuple[int, int]],
        batches: list[ForwardBatch],
        model: ShardedLlamaModel,
        kv_cache: KVCache,
    ) -> list[torch.Tensor]:
        """Send the step to every worker, run rank 0's stage; each micro-batch's logits."""
        t0 = time.perf_counter()
        self._send(("step", blocks_to_copy, batches))
        try:
            kv_cache.copy_blocks(blocks_to_copy)
            out = run_stage(model, kv_cache, batches, self.times)
        except Exception as e:  # a collective failed: find out who is to blame
            raise self._fail(e) from e
        except BaseException:  # Ctrl-C between two collectives: the ranks are out of step
            self._failure = "a parallel step was interrupted; create a new LLM"
            self.shutdown()
            raise
        self.times.wall_s.append(time.perf_counter() - t0)
        return out

    def _send(self, msg: tuple) -> None:
        self._check_running()
        try:
            if self.torchrun:
                dist.broadcast_object_list([msg], src=0, group=self.control)
                return
            data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            for conn in self.conns:
                conn.send_bytes(data)
        except (OSError, RuntimeError) as e:  # a broken pipe / socket: that worker is gone
            raise self._fail(e) from e

    def _ask(self, command: str, mine: Any) -> list[Any]:
        """Every rank's answer to a question (rank 0's is `mine`), in rank order."""
        self._send((command,))
        answers: list[Any] = [None] * self.world_size
        try:
            dist.gather_object(mine, answers, dst=0, group=self.control)
        except Exception as e:
            raise self._fail(e) from e
        return answers

    # ------------------------------------------------------------------ measurements
    def step_stats(self) -> dict[str, Any]:
        """Per-step timings since the last reset: rank 0's wall time of each step, every
        rank's busy time, and the pipeline bubble measured against (p-1)/(m+p-1).

        bubble_measured = 1 - mean over stages of (busy time / wall time), summed over the
        steps; a stage's busy time is its TP rank 0's."""
        per_rank = self._ask("stats", self.times.as_dict())
        wall = sum(self.times.wall_s)
        pc = self.parallel
        stage_busy = [
            sum(per_rank[pc.rank_of(s, 0)]["busy_s"]) for s in range(pc.pipeline_parallel_size)
        ]
        mbs = list(self.times.micro_batches)
        mean_m = sum(mbs) / len(mbs) if mbs else float(self.num_micro_batches)
        return {
            "steps": len(self.times.wall_s),
            "wall_s": wall,
            "stage_busy_s": stage_busy,
            "busy_s_per_rank": [sum(r["busy_s"]) for r in per_rank],
            "mean_micro_batches": mean_m,
            "bubble_measured": 1 - sum(stage_busy) / (len(stage_busy) * wall) if wall else 0.0,
            "bubble_formula": bubble_formula(pc.pipeline_parallel_size, round(mean_m) or 1),
            "per_rank": per_rank,
        }

    def traffic_snapshots(self) -> list[dict[str, dict[str, int]]]:
        """Every rank's traffic counts (minillm.parallel.traffic), in rank order."""
        return self._ask("traffic", traffic.snapshot())

    def reset_stats(self) -> None:
        """Clear the step timings and traffic counts on every rank."""
        self._send(("reset",))
        self.times.clear()
        traffic.reset()

    def _check_running(self) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if self._closed:
            raise RuntimeError("this LLM was closed; its parallel workers are gone")
        if self._dead_workers():
            raise self._fail(None)

    # ------------------------------------------------------------------ failures
    def _dead_workers(self) -> list[tuple[int, BaseProcess]]:
        return [(r, p) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]

    def _death_message(self) -> str:
        parts = []
        for rank, proc in self._dead_workers():
            parts.append(
                f"parallel worker rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
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
        return "\n".join(parts) or "a parallel worker died"

    def _fail(self, cause: BaseException | None) -> RuntimeError:
        """Name the dead worker (give it a moment to be seen dead), then stop the rest."""
        if self.procs and not self._dead_workers():
            ready = wait([p.sentinel for p in self.procs], timeout=min(10.0, self.timeout_s))
            for proc in self.procs:  # its sentinel closes a moment before it can be reaped
                if proc.sentinel in ready:
                    proc.join(10.0)
        if self._dead_workers():
            message = self._death_message()
        elif self.torchrun:
            message = f"a parallel step failed; a torchrun worker (or its host) is gone: {cause}"
        else:
            message = f"a parallel step failed although every worker is alive: {cause}"
        self._failure = message + "\nthe parallel run cannot continue; create a new LLM"
        self.shutdown()
        for hook in self.on_failure:
            hook(self._failure)
        return RuntimeError(self._failure)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the workers (asked to, then killed), join them, leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:  # idle workers leave on "stop"; after a failure, kill
            if self.torchrun:
                try:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.control)
                except Exception:  # noqa: S110 - they are gone already
                    pass
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
        self._restore_cores()


TensorParallelExecutor = ParallelExecutor  # the name before pipeline parallelism existed


def use_torchrun_group() -> None:
    """Called by launch.py on rank 0: the next parallel LLM joins torchrun's workers."""
    _torchrun["active"] = True


def start_parallel(
    model: str, backend: str, parallel: ParallelConfig
) -> tuple[LoadedModel, ParallelExecutor]:
    """Load rank 0's part and start ranks 1..N-1 (a bad size fails before any spawn)."""
    name = resolve_backend_name(backend)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; use one process")
    torchrun = _torchrun.pop("active", False)
    if torchrun:
        if not dist.is_initialized() or dist.get_world_size() != parallel.world_size:
            have = dist.get_world_size() if dist.is_initialized() else "no group"
            raise RuntimeError(
                f"torchrun started {have} processes, but tensor_parallel_size x "
                f"pipeline_parallel_size = {parallel.world_size}; make them equal"
            )
    elif dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: only one "
            "parallel LLM can run per process; close() the other one first"
        )
    timeout_s = distributed_timeout_s()

    def build(config: Any, weights: Any, ops: Any) -> ShardedLlamaModel:
        return ShardedLlamaModel(config, weights, ops, 0, parallel)

    loaded = load_model(model, name, build=build, activations=parallel.activations)
    loaded.weights = loaded.model.shard  # rank 0 keeps its own part only
    executor = ParallelExecutor(parallel, timeout_s)
    if torchrun:
        executor.start_torchrun(loaded.model)
    else:
        executor.start(loaded.path, name, loaded.model)
    return loaded, executor


def start_tensor_parallel(
    model: str, backend: str, world_size: int
) -> tuple[LoadedModel, ParallelExecutor]:
    """Tensor parallelism alone (the API before ParallelConfig)."""
    return start_parallel(model, backend, ParallelConfig(tensor_parallel_size=world_size))
