"""Chat templates from untrusted sources, rendered in worker processes under a budget.

A template is a program. `{% for i in range(100000) %}{% for j in range(10000) %}...` runs for
minutes; `{{ '{:>9999999999}'.format(1) }}` asks for 10 GB in one C call. Jinja's sandbox keeps
a template away from Python's internals, not from using time and memory, and a Python thread
cannot be stopped from outside (nor checked in the middle of one C call). So a template that
comes from a request (Ollama's `template` field) or a Modelfile's TEMPLATE renders in a worker
process, and the budget is enforced from outside:

- time: the caller waits `timeout` seconds for the answer, then kills the worker (the next
  render starts a fresh one);
- memory: the worker caps its own address space (RLIMIT_AS, where the OS has one);
- output: the worker stops rendering once the prompt passes `max_chars`.

The calling thread only waits on a pipe, holding no GIL, so a server's event loop and engine
thread never notice a runaway. The model's own template (shipped with its weights, trusted
like them) does not need this and renders in-process.

Protocol: the worker prints one JSON line when it is ready, then answers each JSON line on its
stdin (a render job) with one JSON line on its stdout: {"text": ...} or {"error": ...}.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RENDER_TIMEOUT = 1.0  # seconds; a chat template renders in milliseconds
WORKER_MEMORY = 512 << 20  # bytes a render may add to the worker's address space
WORKERS = 2
START_TIMEOUT = 60.0  # a fresh worker imports jinja2 (slow on a busy machine)


class TemplateBudgetError(ValueError):
    """A template ran too long, used too much memory or wrote too much: the caller's fault."""


class TemplateSandboxUnavailable(RuntimeError):
    """No worker could take the job: all stayed busy too long, or a new one would not start."""


class _Worker:
    """One worker process and the thread that reads its replies."""

    def __init__(self, memory_bytes: int) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env["PYTHONIOENCODING"] = "utf-8"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minillm.chat_sandbox", str(memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="minillm-template-reader", daemon=True).start()
        ready = self._reply(START_TIMEOUT)
        if not isinstance(ready, dict) or not ready.get("ready"):
            self.kill()
            raise TemplateSandboxUnavailable("a template worker process failed to start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)  # EOF: the worker exited

    def _reply(self, timeout: float) -> dict[str, Any] | str:
        """The next reply, "timeout" or "died"."""
        try:
            line = self.replies.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return "timeout"
        return "died" if line is None else json.loads(line)

    def ask(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """Send one job; its reply, or "timeout" / "died"."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")  # ASCII-only: surrogates survive
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return "died"
        return self._reply(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()


class TemplateSandbox:
    """A small pool of template workers; `render` is blocking and thread-safe.

    Workers start on first use or with `warm()`; one killed for a runaway is replaced in the
    background. `close()` (or garbage collection, or the parent's exit, which closes the
    workers' stdin) ends them.
    """

    def __init__(
        self,
        workers: int = WORKERS,
        timeout: float = RENDER_TIMEOUT,
        memory_bytes: int = WORKER_MEMORY,
        wait_timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.memory_bytes = timeout, memory_bytes
        # how long a render may wait for a free worker (runaways hold one for `timeout` each)
        self.wait_timeout = wait_timeout if wait_timeout is not None else 5 * timeout + 5
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)  # a slot whose worker has not started yet
        self._started: list[_Worker] = []
        self._lock = threading.Lock()  # guards _started
        self._finalizer = weakref.finalize(self, _kill_all, self._started)

    def render(
        self,
        source: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str = "",
        eos_token: str = "",
        add_generation_prompt: bool = True,
        max_chars: int | None = None,
    ) -> str:
        """The prompt `source` (Jinja2 or Ollama's Go syntax) makes of `messages`.

        Raises ValueError for a template that is invalid or fails on these messages,
        TemplateBudgetError (a ValueError) for one over its budget, TemplateSandboxUnavailable
        when no worker came free in `wait_timeout` seconds or none would start.
        """
        job = {
            "source": source,
            "messages": list(messages),
            "bos_token": bos_token,
            "eos_token": eos_token,
            "add_generation_prompt": add_generation_prompt,
            "max_chars": max_chars,
        }
        try:
            worker = self._idle.get(timeout=self.wait_timeout)
        except queue.Empty:
            raise TemplateSandboxUnavailable(
                f"every template worker stayed busy for {self.wait_timeout:g} s"
            ) from None
        try:
            if worker is None or not worker.alive:
                worker = self._start()
            started = time.monotonic()
            reply = worker.ask(job, self.timeout)
        except BaseException:
            self._idle.put(worker)
            raise
        if isinstance(reply, str):  # "timeout" or "died": this worker is done for
            worker.kill()
            self._replace_in_background()
            if reply == "timeout":
                raise TemplateBudgetError(
                    f"the template took longer than {self.timeout:g} s to render "
                    f"(stopped after {time.monotonic() - started:.1f} s)"
                )
            raise TemplateBudgetError(
                "the template's worker process died while rendering it "
                f"(it may need more than {self.memory_bytes >> 20} MiB of memory)"
            )
        self._idle.put(worker)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["text"]

    def warm(self) -> None:
        """Start the workers that are not running yet, in the background (a fresh worker
        takes a fraction of a second; the first renders need not wait for it)."""
        for _ in range(self._idle.qsize()):
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            if worker is not None and worker.alive:
                self._idle.put(worker)
            else:
                self._replace_in_background()

    def _replace_in_background(self) -> None:
        """Fill a worker slot with a fresh worker; renders use the other slots meanwhile."""

        def start() -> None:
            try:
                worker: _Worker | None = self._start()
            except Exception:  # noqa: BLE001 - the slot stays empty; a render retries it
                worker = None
            self._idle.put(worker)

        threading.Thread(target=start, name="minillm-template-start", daemon=True).start()

    def _start(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        with self._lock:
            self._started[:] = [w for w in self._started if w.alive] + [worker]
        return worker

    def close(self) -> None:
        """Stop every worker (a later render starts a new one)."""
        with self._lock:
            _kill_all(self._started)
            self._started.clear()


# ---------------------------------------------------------------------------- the worker
def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus `extra_bytes` (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux: time and output limits still hold
        pass


def _serve(memory_bytes: int) -> None:
    import signal

    from minillm.hub.modelfile import compile_template

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C stops the server, which stops us
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # replies only; stray prints go to stderr
    os.dup2(2, 1)
    _limit_memory(memory_bytes)

    def send(reply: dict[str, Any]) -> None:
        out.write(json.dumps(reply) + "\n")
        out.flush()

    send({"ready": True})
    for line in sys.stdin:
        try:
            job = json.loads(line)
            template = compile_template(job["source"], job["bos_token"], job["eos_token"])
            text = template.render(
                job["messages"],
                add_generation_prompt=job["add_generation_prompt"],
                max_chars=job["max_chars"],
            )
            reply: dict[str, Any] = {"text": text}
        except MemoryError:
            template = text = None  # let the memory go before answering
            reply = {"error": f"the template needs more than {memory_bytes >> 20} MiB of memory"}
        except Exception as e:  # noqa: BLE001 - every failure is the template's, and reported
            reply = {"error": str(e) or type(e).__name__}
        send(reply)


if __name__ == "__main__":
    if hasattr(os, "nice"):  # the server's threads come first; a runaway gets what is left
        os.nice(10)
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else WORKER_MEMORY)
