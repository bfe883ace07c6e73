"""Run one job on N local ranks: rank 0 in the caller, ranks 1..N-1 in spawned processes.

A one-shot job (a context-parallel prefill, a ring-attention check) in two phases per rank:
`prepare(rank, world_size, *prepare_args)` (load a model, build inputs) runs before the group
exists, so a rank that fails there is reported at once with its traceback instead of leaving the
others waiting in the rendezvous; then every rank joins the gloo group and runs
`run(state, *run_args)`, whose picklable result comes back to rank 0 over the worker's pipe.

Processes are spawned, never forked (torch and Numba state must not be copied). Whatever happens
(an error on any rank, a worker killed, Ctrl-C) every worker is joined or killed and the group is
left before this returns or raises, and an error names the failing rank, its pid and how it
ended. Collectives are bounded by the group's timeout, so a lost peer is an error, never a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from minillm.parallel.cores import share_cores, worker_environment
from minillm.parallel.executor import describe_exit
from minillm.parallel.group import connect_store, destroy_group, init_group, open_store

JOIN_GRACE_S = 30.0  # a worker that has sent its result gets this long to exit


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    conn: Connection,
    timeout_s: float,
    prepare: Callable[..., Any],
    prepare_args: tuple,
    run: Callable[..., Any],
    run_args: tuple,
) -> None:
    """A worker: prepare, report ("ready"), join the group, run, report ("done", result)."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides what Ctrl-C means
    code = 0
    try:
        share_cores(world_size, "ref")
        state = prepare(rank, world_size, *prepare_args)
        conn.send_bytes(pickle.dumps(("ready", None)))
        init_group(connect_store(port, world_size, timeout_s), rank, world_size, timeout_s)
        result = run(state, *run_args)
        conn.send_bytes(pickle.dumps(("done", result), protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
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


class _Workers:
    """Ranks 1..N-1 seen from rank 0: their processes, pipes and what they said."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.errors: dict[int, str] = {}

    def collect(self, kind: str, timeout_s: float) -> dict[int, Any]:
        """Wait for message `kind` from every worker; a death or an error raises."""
        pending = {conn: rank for rank, conn in enumerate(self.conns, start=1)}
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            sentinels = [p.sentinel for p in self.procs]
            ready = wait([*pending, *sentinels], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = ", ".join(str(r) for r in pending.values())
                raise RuntimeError(
                    f"{self.what} rank(s) {ranks} sent no {kind!r} within {timeout_s:.0f} s"
                )
            for conn in [c for c in ready if c in pending]:
                rank = pending.pop(conn)
                try:
                    msg, detail = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    msg, detail = "eof", None
                if msg == "error":
                    self.errors[rank] = str(detail)
                if msg != kind:
                    raise RuntimeError(self.failure())
                got[rank] = detail
            if any(s in ready for s in sentinels) and self.dead():
                self._drain()
                raise RuntimeError(self.failure())
        return got

    def dead(self) -> list[tuple[int, BaseProcess]]:
        return [(r, p) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]

    def _drain(self) -> None:
        """Read the last words (an error report) of workers that have exited."""
        for rank, _ in self.dead():
            conn = self.conns[rank - 1]
            try:
                while conn.poll():
                    msg, detail = pickle.loads(conn.recv_bytes())
                    if msg == "error":
                        self.errors[rank] = str(detail)
            except (EOFError, OSError):
                pass

    def failure(self, cause: BaseException | None = None) -> str:
        """Name who failed and how: dead workers first, then reported errors, then `cause`."""
        if not self.dead() and self.procs:  # a peer's death reaches rank 0 a moment early
            ready = wait([p.sentinel for p in self.procs], timeout=5.0)
            for proc in self.procs:
                if proc.sentinel in ready:
                    proc.join(5.0)
        self._drain()
        parts = []
        for rank, proc in self.dead():
            if proc.exitcode != 0:
                parts.append(
                    f"{self.what} rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
                )
        for rank, text in sorted(self.errors.items()):
            parts.append(f"rank {rank} reported:\n{text.rstrip()}")
        if cause is not None:
            parts.append(f"rank 0 failed: {type(cause).__name__}: {cause}")
        return "\n".join(parts) or f"a {self.what} failed"

    def stop(self, graceful: bool) -> None:
        """Join workers that are finishing (graceful), kill any other. Idempotent."""
        deadline = time.monotonic() + JOIN_GRACE_S
        for proc in self.procs:
            if graceful and proc.exitcode is None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
        for conn in self.conns:
            conn.close()


def run_on_ranks(
    world_size: int,
    state0: Any,
    prepare: Callable[..., Any],
    prepare_args: tuple,
    run: Callable[..., Any],
    run_args: tuple,
    timeout_s: float,
    what: str = "context-parallel worker",
) -> list[Any]:
    """run(state, *run_args) on every rank; [rank 0's result, rank 1's, ...].

    state0 is rank 0's prepared state (prepared by the caller, before anything is spawned, so
    bad input fails first); `prepare` and `run` must be importable module-level functions."""
    if world_size == 1:
        return [run(state0, *run_args)]
    workers = _Workers(what)
    ok = False
    try:
        store = open_store(world_size, timeout_s)
        ctx = mp.get_context("spawn")
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            args = (rank, world_size, store.port, child, timeout_s)
            proc = ctx.Process(
                target=_rank_main,
                args=(*args, prepare, prepare_args, run, run_args),
                name=f"minillm-cp-rank{rank}",
                daemon=True,
            )
            with worker_environment():  # idle thread pools sleep, see cores.py
                proc.start()
            child.close()  # EOF on our end as soon as the worker is gone
            workers.procs.append(proc)
            workers.conns.append(parent)
        workers.collect("ready", max(timeout_s, 300.0))  # loading a model can take a while
        init_group(store, 0, world_size, timeout_s)
        restore_cores = share_cores(world_size, "ref")  # torch's pool; see cores.py
        try:
            result0 = run(state0, *run_args)
        except Exception as e:  # a collective failed or rank 0's own code did: say who
            raise RuntimeError(workers.failure(e)) from e
        finally:
            restore_cores()
        done = workers.collect("done", timeout_s)
        ok = True
        return [result0, *(done[r] for r in range(1, world_size))]
    finally:
        workers.stop(graceful=ok)  # after a failure, kill: peers may wait on a dead rank
        destroy_group()
