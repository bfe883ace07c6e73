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
exit, on their pipe's end of file, but unasked). So a parallel server handles SIGTERM itself
(by returning: uvicorn has done the shutdown already), and `minillm serve` goes on to close the
LLM and exit with 0 after a SIGTERM, or 1 after a worker failure.
"""

from __future__ import annotations

import logging
import os
import signal
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
    signal.signal(signal.SIGTERM, _after_uvicorn)  # uvicorn installs its own while serving
    if executor.procs:
        threading.Thread(target=watch, name="minillm-worker-watch", daemon=True).start()


def _after_uvicorn(signum: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handler: uvicorn has shut down; the caller cleans up."""
