"""One prompt streamed to two models at once, with live TTFT and tokens/s for each side.

Each side streams on its own thread through the `openai` SDK (any OpenAI-compatible server or
the gateway in front of them); the generator merges their progress and yields a snapshot of
both sides after every chunk, so a UI can redraw both answers as they grow. Closing the
generator (a Stop button) closes both HTTP streams, which makes a minillm upstream abort.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from labs.lab2_api_chat.app import stats_line

if TYPE_CHECKING:
    import openai

UPSTREAM_HEADER = "x-minillm-upstream"  # the gateway names the upstream that answered


@dataclass(frozen=True)
class Side:
    """What one model has streamed so far, measured on the client."""

    model: str
    text: str = ""
    tokens: int = 0  # content chunks so far; the server's usage count once it arrives
    ttft: float | None = None  # seconds from the request to the first text
    elapsed: float = 0.0  # seconds from the request to this snapshot
    done: bool = False
    finish_reason: str | None = None
    error: str | None = None
    upstream: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the tokens after the first over the time after the first."""
        if self.ttft is None or self.tokens < 2 or self.elapsed <= self.ttft:
            return 0.0
        return (self.tokens - 1) / (self.elapsed - self.ttft)

    def stats(self) -> str:
        """The line under an answer: live while streaming, Lab 2's stats line at the end."""
        if self.error:
            return f"**error:** {self.error}"
        if self.done:
            ttft = self.ttft if self.ttft is not None else self.elapsed
            return stats_line(self.tokens, ttft, self.elapsed, self.finish_reason)
        if self.ttft is None:
            return f"*waiting for the first token · {self.elapsed:.2f} s*"
        return (
            f"*streaming · {self.tokens} tokens · {self.tokens_per_s:.1f} tokens/s · "
            f"TTFT {self.ttft:.2f} s*"
        )


def stream_pair(
    client: openai.OpenAI,
    models: tuple[str, str],
    messages: list[dict],
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 128,
    seed: int | None = None,
) -> Iterator[tuple[Side, Side]]:
    """Yield (left, right) snapshots until both answers are finished (or failed)."""
    import openai

    sides = [Side(models[0]), Side(models[1])]
    lock, events, stop = threading.Lock(), queue.Queue(), threading.Event()
    start = time.perf_counter()

    def update(i: int, **changes: object) -> None:
        with lock:
            sides[i] = replace(sides[i], elapsed=time.perf_counter() - start, **changes)
        events.put(i)

    def run(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=models[i],
                messages=messages,
                temperature=temperature,
                top_p=top_p,
                max_tokens=int(max_tokens),
                seed=seed,
                stream=True,
                stream_options={"include_usage": True},
            )
            update(i, upstream=stream.response.headers.get(UPSTREAM_HEADER))
            with closing(stream):
                for chunk in stream:
                    if stop.is_set():
                        return
                    s = sides[i]
                    changes: dict[str, object] = {}
                    if chunk.usage is not None:
                        changes["tokens"] = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            changes["finish_reason"] = choice.finish_reason
                        if choice.delta.content:
                            now = time.perf_counter() - start
                            changes["text"] = s.text + choice.delta.content
                            changes["tokens"] = s.tokens + 1
                            changes.setdefault("ttft", s.ttft if s.ttft is not None else now)
                    if changes:
                        update(i, **changes)
            update(i, done=True)
        except openai.APIStatusError as e:
            update(i, done=True, error=f"{models[i]}: the server said {e.status_code}: {e.message}")
        except Exception as e:  # noqa: BLE001 - any failure must end this side, never hang it
            update(i, done=True, error=f"{models[i]}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        while True:
            events.get()
            with lock:
                snapshot = (sides[0], sides[1])
            yield snapshot
            if snapshot[0].done and snapshot[1].done:
                return
    finally:
        stop.set()  # a closed generator (Stop) makes both threads close their streams
        for t in threads:
            t.join(timeout=30)
