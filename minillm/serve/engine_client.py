"""ServingEngine: what both APIs share -- the model, one AsyncLLMEngine, checks and metrics.

Every request is checked *before* it reaches the engine (model name, capacity, prompt length
against the context), so a bad request gets a clear 4xx before any streaming starts, and the
engine only ever sees requests it can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import Request

from minillm.engine.async_engine import AsyncLLMEngine
from minillm.engine.outputs import RequestOutput
from minillm.hub.modelfile import Modelfile
from minillm.llm import LLM
from minillm.sampling import SamplingParams
from minillm.serve.errors import APIError, bad_request
from minillm.serve.metrics import ServerMetrics

DISCONNECT_POLL_SECONDS = 0.25


class ServingEngine:
    def __init__(
        self,
        llm: LLM,
        names: Sequence[str],
        profile: Modelfile | None = None,
        max_queued_requests: int = 512,
    ) -> None:
        if not names:
            raise ValueError("a server needs at least one served model name")
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self.llm, self.names, self.profile = llm, list(names), profile
        self.engine = llm.engine
        self.async_engine = AsyncLLMEngine(llm.engine)
        self.metrics = ServerMetrics(llm.engine, self.names[0])
        self.async_engine.on_finished.append(self.metrics.on_finished)
        self.max_queued_requests = max_queued_requests
        self.in_flight = 0
        self.ready = False
        self.started_at = time.time()
        default = llm.loaded.chat_template
        self._render = profile.prompt_renderer(default) if profile else default.render

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.async_engine.start()
        self.ready = True

    def shutdown(self) -> None:
        self.ready = False
        self.async_engine.shutdown()

    @property
    def healthy(self) -> bool:
        return self.ready and self.async_engine.is_running

    # ------------------------------------------------------------------ checks
    @property
    def model_name(self) -> str:
        return self.names[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None, required: bool = False) -> str:
        """The served name the request asked for (None: the default one when allowed)."""
        if name is None or name == "":
            if required:
                raise bad_request("model is required", "model")
            return self.model_name
        for served in self.names:
            if name == served or name.removesuffix(":latest") == served.removesuffix(":latest"):
                return served
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in self.names)}",
            "model",
        )

    def check_ready(self) -> None:
        if not self.healthy:
            raise APIError(
                503,
                "the engine is not running (the server is starting up or "
                "shutting down); retry shortly",
            )
        if self.in_flight >= self.max_queued_requests:
            raise APIError(
                503,
                f"the server is overloaded: {self.in_flight} requests in flight "
                f"(limit {self.max_queued_requests}); retry later",
            )

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text of a conversation: Modelfile SYSTEM/MESSAGEs first, then the chat
        template (the Modelfile's TEMPLATE if it has one, else the model's own)."""
        convo = self.profile.conversation(messages) if self.profile else list(messages)
        try:
            return self._render(convo)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "messages") from e

    def encode(
        self,
        prompt: str | list[int],
        max_tokens: int | None = None,
        context_limit: int | None = None,
        param: str = "messages",
    ) -> list[int]:
        """Token ids of the prompt, checked against the context length.

        A prompt that leaves no room to generate is a 400 that gives both numbers; so is a
        `max_tokens` that cannot fit after the prompt (vLLM does the same).
        """
        ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = min(self.max_model_len, context_limit or self.max_model_len)
        if not ids:
            raise bad_request("the prompt is empty: it must contain at least one token", param)
        vocab = self.llm.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param)
        if len(ids) >= limit:
            raise bad_request(
                f"the prompt is {len(ids)} tokens long, but this model's context length is "
                f"{limit} tokens, which leaves no room to generate; shorten the prompt",
                param,
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise bad_request(
                f"max_tokens={max_tokens} is too large: the prompt has {len(ids)} tokens and the "
                f"context length is {limit}, so at most {limit - len(ids)} can be generated",
                "max_tokens",
            )
        return ids

    def sampling_defaults(self) -> dict[str, Any]:
        """The Modelfile's PARAMETERs as SamplingParams keywords (a request overrides them)."""
        return self.profile.sampling_kwargs() if self.profile else {}

    # ------------------------------------------------------------------ generation
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's cumulative outputs; also observes inter-token latency.

        Closing this generator early (a client that left) aborts the request."""
        self.check_ready()
        self.in_flight += 1
        last_time, last_count = None, 0
        try:
            async for out in self.async_engine.generate(prompt_ids, params, request_id):
                now = time.perf_counter()
                count = len(out.outputs[0].token_ids) if out.outputs else 0
                if last_time is not None and count > last_count:
                    self.metrics.observe_token_gap(now - last_time, count - last_count)
                if count > last_count:
                    last_time, last_count = now, count
                yield out
        finally:
            self.in_flight -= 1

    async def generate_to_end(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        request: Request | None,
    ) -> RequestOutput:
        """Run a request to its final output; abort it if the HTTP client goes away first."""
        gen = self.generate(prompt_ids, params, request_id)
        final: RequestOutput | None = None

        async def consume() -> None:
            nonlocal final
            async for out in gen:
                final = out

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and request is not None and await request.is_disconnected():
                    task.cancel()
                    break
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if not task.done():  # we are being cancelled ourselves: stop the consumer first
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await gen.aclose()
        if task.cancelled():
            raise APIError(499, "the client closed the request")
        if final is None:
            raise APIError(500, "the engine ended the request without an output")
        return final
