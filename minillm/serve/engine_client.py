"""ServingEngine: what both APIs share -- the model, one AsyncLLMEngine, checks and metrics.

Every request is checked *before* it reaches the engine (model name, n, capacity, prompt length
against the context), so a bad request gets a clear 4xx before any streaming starts, and the
engine only ever sees requests it can serve.

Nothing slow runs on the event loop: templates render and prompts are tokenized in worker
threads (the Rust tokenizer's batch call releases the GIL, its single-text call does not), and
templates that come from users render in worker processes under a time, memory and output
budget (minillm.chat_sandbox). Routes get it as a dependency: `serving: ServingDep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from minillm.chat import validate_messages
from minillm.chat_sandbox import RENDER_TIMEOUT, TemplateSandbox, TemplateSandboxUnavailable
from minillm.engine.async_engine import AsyncLLMEngine
from minillm.engine.llm_engine import PromptError
from minillm.engine.outputs import RequestOutput
from minillm.hub.modelfile import Modelfile
from minillm.llm import LLM
from minillm.sampling import SamplingParams
from minillm.serve.admission import Admission
from minillm.serve.errors import APIError, bad_request
from minillm.serve.metrics import ServerMetrics
from minillm.serve.model_facts import ModelFacts

if TYPE_CHECKING:
    from minillm.serve.pd_decode import PrefillClient

DISCONNECT_POLL_SECONDS = 0.25
DEFAULT_MAX_N = 16
# A prompt rendered by a user's template may be at most this many characters per token of
# context: far more than any tokenizer packs into a token, so it only stops runaways.
PROMPT_CHARS_PER_TOKEN = 32


def get_serving(request: Request) -> ServingEngine:
    """The app's ServingEngine (a FastAPI dependency: `Depends(get_serving)`)."""
    return request.app.state.serving


class ServingEngine:
    def __init__(
        self,
        llm: LLM,
        names: Sequence[str],
        profile: Modelfile | None = None,
        max_queued_requests: int = 512,
        max_n: int = DEFAULT_MAX_N,
        template_timeout: float = RENDER_TIMEOUT,
        aliases: Sequence[str] = (),
    ) -> None:
        if not names:
            raise ValueError("a server needs at least one served model name")
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.llm, self.names, self.profile = llm, list(names), profile
        self.aliases = list(aliases)  # accepted as model names, never listed (e.g. a path)
        self.engine = llm.engine
        self.async_engine = AsyncLLMEngine(llm.engine)
        self.metrics = ServerMetrics(llm.engine, self.names[0])
        self.async_engine.on_finished.append(self.metrics.on_finished)
        self.max_queued_requests = max_queued_requests  # counts sequences (see admission.py)
        self.max_n = max_n
        self.in_flight = 0  # sequences admitted and not yet finished
        self.ready = False
        self.started_at = time.time()
        self.facts = ModelFacts(llm, self.names[0], profile)
        self.templates = TemplateSandbox(timeout=template_timeout)
        self._template_threads = ThreadPoolExecutor(8, thread_name_prefix="minillm-template")
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        # a decode server of a PD pair computes prompts on its prefill server (pd_decode.py)
        self.prefill_client: PrefillClient | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.async_engine.start()
        if self.profile and self.profile.template:  # every chat will render it
            self.templates.warm()
        self.ready = True

    def shutdown(self) -> None:
        self.ready = False
        self.async_engine.shutdown()
        self.templates.close()

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

    @property
    def max_prompt_chars(self) -> int:
        return max(1 << 20, PROMPT_CHARS_PER_TOKEN * self.max_model_len)

    def check_model(self, name: str | None, required: bool = False) -> str:
        """The served name the request asked for (None: the default one when allowed)."""
        if name is None or name == "":
            if required:
                raise bad_request("model is required", "model")
            return self.model_name
        if name in self.aliases:
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

    def check_n(self, n: int) -> None:
        """n (completions per prompt) within this server's limit: a 400 that names both."""
        if isinstance(n, int) and n > self.max_n:
            raise bad_request(
                f"n={n} is too large: this server returns at most {self.max_n} completions "
                "per prompt (minillm serve --max-n)",
                "n",
            )
        if isinstance(n, int) and n > 1 and self.prefill_client is not None:
            raise bad_request(
                f"n={n}: a disaggregated decode server returns one completion per prompt "
                "(n=1); send n requests, or use a colocated server",
                "n",
            )

    def check_ready(self) -> None:
        """A 503 when the engine is not running or already full, before any work is spent on
        the request (`admit` checks again, for the request's own sequences)."""
        if not self.healthy:
            raise APIError(
                503,
                "the engine is not running (the server is starting up or "
                "shutting down); retry shortly",
            )
        if self.in_flight >= self.max_queued_requests:
            raise self._overloaded(1)

    def _overloaded(self, sequences: int) -> APIError:
        return APIError(
            503,
            f"the server is overloaded: {self.in_flight} sequences in flight and this "
            f"request needs {sequences} (limit {self.max_queued_requests}); retry later",
        )

    def check_fits(self, sequences: int, what: str = "") -> None:
        """A 400 for a request that needs more sequences than the server ever runs at once."""
        limit = self.max_queued_requests
        if sequences > limit:
            raise bad_request(
                f"this request needs {sequences} sequences{what}, more than this server runs "
                f"at once ({limit}; minillm serve --max-queued-requests)",
                "n",
            )

    def admit(self, sequences: int, what: str = "") -> Admission:
        """Reserve `sequences` against the limit, or refuse: 400 if the request could never
        fit, 503 if the server is too busy now. Release it when the response is done."""
        self.check_ready()
        self.check_fits(sequences, what)
        if self.in_flight + sequences > self.max_queued_requests:
            raise self._overloaded(sequences)
        return Admission(self, sequences)

    # ------------------------------------------------------------------ prompts
    async def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], template: str | None = None
    ) -> str:
        """The prompt text of a conversation: Modelfile SYSTEM/MESSAGEs first, then a template.

        `template` (a request's own, e.g. Ollama's `template` field) or the Modelfile's TEMPLATE
        renders in the template sandbox; the model's own template in a worker thread.
        """
        source = template or (self.profile.template if self.profile else None)
        param = "template" if template else "messages"
        try:
            convo = self.profile.conversation(messages) if self.profile else list(messages)
            if not source:
                return await asyncio.to_thread(self.llm.loaded.chat_template.render, convo)
            own = self.llm.loaded.chat_template
            render = functools.partial(
                self._render_untrusted,
                source,
                convo,
                "" if template else own.bos_token,
                "" if template else own.eos_token,
            )
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._template_threads, render)
        except TemplateSandboxUnavailable as e:
            raise APIError(503, f"the template renderer is unavailable ({e}); retry later") from e
        except (ValueError, TypeError) as e:
            raise bad_request(f"template: {e}" if template else str(e), param) from e

    def _render_untrusted(
        self, source: str, convo: list[Any], bos_token: str, eos_token: str
    ) -> str:
        clean = validate_messages(convo)
        return self.templates.render(
            source,
            clean,
            bos_token=bos_token,
            eos_token=eos_token,
            max_chars=self.max_prompt_chars,
        )

    async def tokenize(self, text: str, keep: int) -> tuple[int, list[int]]:
        """(number of tokens in `text`, its first `keep` token ids), in a worker thread.

        The count comes from the Rust side, so a prompt far too long for the context is
        refused without building a Python list of its millions of ids."""
        return await asyncio.to_thread(self._tokenize, text, keep)

    def _tokenize(self, text: str, keep: int) -> tuple[int, list[int]]:
        try:
            return self.llm.tokenizer.count_and_head(text, keep)
        except (TypeError, ValueError) as e:  # e.g. text the tokenizer cannot take
            raise bad_request(f"the prompt cannot be tokenized: {e}") from e

    async def encode(
        self,
        prompt: str | list[int],
        max_tokens: int | None = None,
        context_limit: int | None = None,
        param: str = "messages",
        prefix: Sequence[int] = (),
    ) -> list[int]:
        """Token ids of `prefix` + the prompt, checked against the context length.

        A prompt that leaves no room to generate is a 400 that gives both numbers; so is a
        `max_tokens` that cannot fit after the prompt (vLLM does the same).
        """
        limit = min(self.max_model_len, context_limit or self.max_model_len)
        if isinstance(prompt, str):
            count, ids = await self.tokenize(prompt, limit) if prompt else (0, [])
        else:
            ids = list(prompt)
            count = len(ids)
        count, ids = count + len(prefix), [*prefix, *ids]  # ids: at most `limit` of them
        try:
            self.engine.check_prompt(ids, max_tokens, context_limit, num_tokens=count)
        except PromptError as e:
            raise bad_request(str(e), param if e.field == "prompt" else e.field) from e
        return ids

    def sampling_defaults(self) -> dict[str, Any]:
        """The Modelfile's PARAMETERs as SamplingParams keywords (a request overrides them)."""
        return self.profile.sampling_kwargs() if self.profile else {}

    def _token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ generation
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Embeddings of token-id inputs, computed on the engine thread between two steps."""
        try:
            return await self.async_engine.embed(inputs)
        except PromptError as e:
            raise bad_request(str(e), e.field) from e
        except NotImplementedError as e:  # e.g. a model split over processes (parallel/)
            raise APIError(501, str(e)) from e

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs, in the kind `params.output_kind` asks for (DELTA for streams,
        FINAL_ONLY otherwise). The caller holds an Admission for the request's sequences.

        Also observes inter-token latency: the gaps between the first choice's tokens, as the
        engine timed them (RequestMetrics.token_times), whatever the output kind. Closing this
        generator early (a client that left) aborts the request."""
        seen = 1  # token_times[0] opens the first gap
        if self.prefill_client is not None:
            outs = self.prefill_client.generate(self.async_engine, prompt_ids, params, request_id)
        else:
            outs = self.async_engine.generate(prompt_ids, params, request_id)
        async for out in outs:
            times = out.metrics.token_times
            for i in range(seen, len(times)):
                self.metrics.observe_token_gap(times[i] - times[i - 1])
            seen = max(seen, len(times))
            yield out

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


ServingDep = Annotated[ServingEngine, Depends(get_serving)]  # a route's `serving: ServingDep`
