"""What `minillm serve` does differently when the model is split over processes.

One scheduler runs in the server process (rank 0); the workers only hold shards. A worker that
dies must end the server, not leave it answering every request with an error. Two things notice
a death: a step whose collective fails (the executor fails the requests in flight and calls its
`on_failure` hooks), and, for a server sitting idle, a thread that waits on the spawned
workers' process sentinels. Either logs the reason and sends the server SIGTERM, once (a second
SIGTERM would make uvicorn quit without letting the failed responses go out), which uvicorn
handles like Ctrl-C: it stops accepting, lets the error responses finish, runs the shutdown.
`minillm serve` then closes the LLM (which stops every worker left) and exits with status 1.

uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that
would kill the server right there, before it could stop its workers in order (they would still
exit, on their pipe's end of file, but unasked). So a parallel server handles SIGTERM itself:
it raises SystemExit (status 0, or 1 after a worker failure, whose reason it prints), which
leaves through `minillm serve`'s cleanup, where the LLM and so every worker is closed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import wait
from typing import Any

from minillm.parallel.executor import describe_exit

log = logging.getLogger("minillm.serve")


def stop_server_on_failure(llm: Any) -> None:
    """Make a failed parallel run (or a worker that dies while idle) stop this process."""
    executor = llm.executor
    if executor is None:
        return
    once = threading.Lock()

    def stop(reason: str) -> None:
        if not once.acquire(blocking=False):
            return
        log.error("a parallel worker failed; stopping the server:\n%s", reason)
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        procs = list(executor.procs)
        wait([p.sentinel for p in procs])  # returns when the first worker ends
        if executor.closed:  # a normal shutdown: nothing to report
            return
        for rank, proc in enumerate(procs, start=1):
            proc.join(5.0)  # its sentinel closes a moment before it can be reaped
            if proc.exitcode is not None:
                reason = (
                    f"parallel worker rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
                )
                executor.mark_failed(reason)
                stop(reason)
                return

    executor.on_failure.append(stop)

    def terminated(signum: int, frame: object) -> None:
        """SIGTERM outside uvicorn's own handler: before uvicorn runs, or re-raised by it once
        it has shut down. Leave through the callers' cleanup (`minillm serve` closes the LLM)."""
        failure = executor.failure
        if failure:
            print(f"error: the server stopped because {failure}", file=sys.stderr, flush=True)
        raise SystemExit(1 if failure else 0)

    signal.signal(signal.SIGTERM, terminated)  # uvicorn installs its own while serving
    if executor.procs:
        threading.Thread(target=watch, name="minillm-worker-watch", daemon=True).start()
