"""AsyncLLMEngine: many concurrent clients, one engine loop.

The engine is plain, single-threaded Python, so it gets one thread of its own that does
nothing but ``step()``. Coroutines hand it commands (add, abort) through a thread-safe
queue and receive outputs on per-request asyncio queues. Every live request joins the next
step, which is what makes a server's concurrent clients share batches (continuous batching).
A bad request fails alone; an error inside ``step()`` fails the requests in flight and the
loop goes on serving the next ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from minillm.engine.llm_engine import LLMEngine
from minillm.engine.outputs import RequestOutput
from minillm.engine.prefilled import PrefilledPrompt
from minillm.sampling import SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput | BaseException | None (end)

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.on_finished: list[Callable[[RequestOutput], None]] = []  # metrics hooks
        self.errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ client side
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        Leaving the loop early (a client that disconnects) aborts the request, which frees
        its KV blocks."""
        rid = request_id or f"req-{next(self._ids)}"
        add = ("add", (rid, prompt, params or SamplingParams(), time.perf_counter()))
        async with contextlib.aclosing(self._request(rid, add)) as items:
            async for item in items:
                yield item

    async def generate_prefilled(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prefilled: PrefilledPrompt,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Like `generate`, for a prompt whose K/V and first token a prefill server computed
        (LLMEngine.add_prefilled_request): the first output carries that token."""
        rid = request_id or f"req-{next(self._ids)}"
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        add = ("add_prefilled", (rid, prompt_ids, params, prefilled, arrival))
        async with contextlib.aclosing(self._request(rid, add)) as items:
            async for item in items:
                yield item

    async def prefill(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> PrefilledPrompt:
        """Compute a prompt and its first token for a decode server
        (LLMEngine.add_prefill_request); returns the token and the prompt's K/V."""
        rid = request_id or f"req-{next(self._ids)}"
        async with contextlib.aclosing(
            self._request(rid, ("prefill", (rid, prompt_ids, params)))
        ) as items:
            async for item in items:
                if isinstance(item, PrefilledPrompt):
                    return item
        raise RuntimeError(f"the engine ended prefill request {rid!r} without its K/V")

    async def _request(self, rid: str, command: tuple[str, Any]) -> AsyncIterator[Any]:
        """Send one request's command to the engine thread and yield what it delivers."""
        self.start()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream
        self._commands.put(command)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if isinstance(item, RequestOutput) and item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", rid))
            self._streams.pop(rid, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embeddings of token-id inputs, computed on the engine thread between two steps.

        One thread runs the model, so an embedding never races a step for the kernels' thread
        pool or the backend's buffers; it waits at most one step to start."""
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[list[float]]] = loop.create_future()
        self._commands.put(("call", (lambda: self.engine.embed(inputs), loop, done)))
        return await done

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            block = not eng.has_unfinished_requests()
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if not eng.has_unfinished_requests():
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # a bug must not kill the server: fail what was in flight
                self.errors += 1
                for rid in list(eng.requests):
                    eng.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e!r}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
                if out.finished:
                    for hook in self.on_finished:
                        hook(out)
        self._fail_pending()

    def _fail_pending(self) -> None:
        """On shutdown nobody is left waiting: queued commands and live requests get an error."""
        stopped = RuntimeError("the engine shut down before this request finished")
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind in ("add", "add_prefilled", "prefill"):
                self._deliver(arg[0], stopped)
            elif kind == "call":
                _fn, loop, done = arg
                loop.call_soon_threadsafe(_settle, done, None, stopped)
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._deliver(rid, stopped)

    def _handle(self, cmd: tuple[str, Any]) -> None:
        kind, arg = cmd
        if kind == "add":
            rid, prompt, params, arrival = arg
            if rid not in self._streams:  # the client left before we got to it
                return
            try:
                self.engine.add_request(rid, prompt, params, arrival_time=arrival)
            except Exception as e:  # bad input: this request fails, nobody else notices
                self._deliver(rid, e)
        elif kind in ("add_prefilled", "prefill"):
            rid = arg[0]
            if rid not in self._streams:
                return
            try:
                if kind == "prefill":
                    _, ids, params = arg
                    sink = functools.partial(self._deliver, rid)  # called inside a step
                    self.engine.add_prefill_request(rid, ids, params, sink)
                else:
                    _, ids, params, prefilled, arrival = arg
                    self.engine.add_prefilled_request(rid, ids, params, prefilled, arrival)
            except Exception as e:  # noqa: BLE001 - this request fails, nobody else notices
                self._deliver(rid, e)
        elif kind == "abort":
            out = self.engine.abort_request(arg)
            if out is not None:
                self._deliver(arg, out)
        elif kind == "call":
            fn, loop, done = arg
            try:
                result = fn()
            except Exception as e:  # the caller gets it; the loop goes on
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

    def _deliver(self, rid: str, item: Any) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.put(item)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Resolve a caller's future on its own loop (unless the caller gave up on it)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
