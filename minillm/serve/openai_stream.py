"""OpenAI streaming: Server-Sent Events for chat and legacy completions.

One `data: {chunk}` line per step that produced text, the finish reason on each choice's last
chunk, an optional usage chunk (`stream_options: {"include_usage": true}`, with `choices: []`),
then `data: [DONE]`. An error after the stream has started cannot change the HTTP status any
more, so it is sent as a `data: {"error": ...}` event before [DONE], as vLLM does.

Streams ask the engine for RequestOutputKind.DELTA: each output carries, per choice, only what
is new (text, token ids, logprobs) and the finish reason once; nothing here re-derives deltas.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from minillm.engine.outputs import CompletionOutput, RequestOutput
from minillm.sampling import SamplingParams
from minillm.serve.engine_client import ServingEngine
from minillm.serve.errors import APIError, internal_error, openai_error
from minillm.serve.openai_logprobs import chat_logprobs, completion_logprobs
from minillm.serve.protocol import UsageInfo

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def finish_reason(c: CompletionOutput) -> str | None:
    """The engine's reason in OpenAI's words (an aborted choice simply stopped)."""
    if c.finish_reason is None:
        return None
    return "stop" if c.finish_reason == "abort" else c.finish_reason


def usage_of(outs: list[RequestOutput]) -> UsageInfo:
    """Usage of finished requests whose outputs are whole (FINAL_ONLY or CUMULATIVE)."""
    return usage(
        sum(len(o.prompt_token_ids) for o in outs),
        sum(len(c.token_ids) for o in outs for c in o.outputs),
        sum(o.metrics.num_cached_tokens for o in outs),
    )


def usage(prompt: int, completion: int, cached: int | None = None) -> UsageInfo:
    details = None if cached is None else {"cached_tokens": cached}
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


async def guarded(events: AsyncIterator[str], where: str) -> AsyncIterator[str]:
    """Errors after the stream started become an error event; [DONE] always ends it."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield sse(openai_error(e.status, e.message, e.param))
    except ValueError as e:
        yield sse(openai_error(400, str(e)))
    except Exception as e:  # noqa: BLE001 - a stream must end cleanly whatever happened
        yield sse(openai_error(500, internal_error(where, e)))
    yield sse("[DONE]")


@dataclass
class ChatStream:
    """/v1/chat/completions with stream=true."""

    serving: ServingEngine
    ids: list[int]
    params: SamplingParams
    rid: str
    model: str
    created: int
    include_usage: bool
    want_logprobs: bool
    top: int

    def events(self) -> AsyncIterator[str]:
        return guarded(self._events(), "/v1/chat/completions")

    async def _events(self) -> AsyncIterator[str]:
        base = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created}
        base["model"] = self.model
        started: set[int] = set()  # choices whose first chunk (the role) was sent
        last, generated = None, 0
        gen = self.serving.generate(self.ids, self.params, self.rid)
        try:
            async for out in gen:
                last = out
                for c in out.outputs:
                    generated += len(c.token_ids)
                    if c.index not in started:
                        started.add(c.index)
                        role = {"role": "assistant", "content": ""}
                        yield sse({**base, "choices": [self._choice(c, role, None, None)]})
                    reason = finish_reason(c)
                    if not (c.text or reason or (self.want_logprobs and c.token_ids)):
                        continue
                    lp = None
                    if self.want_logprobs:
                        lp = chat_logprobs(
                            self.serving.token_text, c.token_ids, c.logprobs or [], self.top
                        )
                    delta = {"content": c.text} if c.text else {}
                    yield sse({**base, "choices": [self._choice(c, delta, lp, reason)]})
        finally:
            await gen.aclose()
        if self.include_usage and last is not None:
            total = usage(len(last.prompt_token_ids), generated, last.metrics.num_cached_tokens)
            yield sse({**base, "choices": [], "usage": total.model_dump()})

    @staticmethod
    def _choice(c: CompletionOutput, delta: dict, lp: Any, reason: str | None) -> dict[str, Any]:
        choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        if reason:
            choice["stop_reason"] = c.stop_reason
        return choice


@dataclass
class CompletionStream:
    """/v1/completions with stream=true: every prompt's n choices, interleaved as they come."""

    serving: ServingEngine
    ids: list[list[int]]
    texts: list[str]
    params: SamplingParams
    rid: str
    model: str
    created: int
    include_usage: bool
    echo: bool
    logprobs: int | None

    def events(self) -> AsyncIterator[str]:
        return guarded(self._events(), "/v1/completions")

    async def _events(self) -> AsyncIterator[str]:
        base = {"id": self.rid, "object": "text_completion", "created": self.created}
        base["model"] = self.model
        started: set[tuple[int, int]] = set()  # (prompt, choice): echo goes before the first
        offsets: dict[tuple[int, int], int] = {}  # text sent per choice, for text_offset
        prompt_tokens, generated = 0, 0
        gens = [
            self.serving.generate(p, self.params, f"{self.rid}-{i}") for i, p in enumerate(self.ids)
        ]
        try:
            async for i, out in merge(gens):
                for c in out.outputs:
                    key = (i, c.index)
                    generated += len(c.token_ids)
                    text = c.text
                    if key not in started:
                        started.add(key)
                        text = self.texts[i] + text if self.echo else text
                    reason = finish_reason(c)
                    if not (text or reason or (self.logprobs is not None and c.token_ids)):
                        continue
                    lp = None
                    if self.logprobs is not None:
                        lp = completion_logprobs(
                            self.serving.token_text,
                            c.token_ids,
                            c.logprobs or [],
                            self.logprobs,
                            offsets.get(key, 0),
                        )
                        offsets[key] = offsets.get(key, 0) + len(text)
                    choice = {
                        "index": i * self.params.n + c.index,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": reason,
                        **({"stop_reason": c.stop_reason} if reason else {}),
                    }
                    yield sse({**base, "choices": [choice]})
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids)
        finally:
            for g in gens:
                await g.aclose()
        if self.include_usage and (prompt_tokens or generated):
            yield sse(
                {**base, "choices": [], "usage": usage(prompt_tokens, generated).model_dump()}
            )


async def merge(
    gens: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come (one prompt: no tasks needed)."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
            return
        await queue.put(done)

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
