"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Streaming is Server-Sent Events: one `data: {chunk}` line per step that produced text, the
finish reason on each choice's last chunk, an optional usage chunk (`stream_options:
{"include_usage": true}`, with `choices: []`), then `data: [DONE]`. An error after the stream
has started cannot change the HTTP status any more, so it is sent as a `data: {"error": ...}`
event before [DONE], as vLLM does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from minillm.engine.outputs import CompletionOutput, RequestOutput
from minillm.sampling import SamplingParams
from minillm.serve.embeddings import embed_many
from minillm.serve.engine_client import ServingEngine
from minillm.serve.errors import APIError, bad_request, from_value_error, openai_error
from minillm.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

# request field -> SamplingParams field, copied when the client set it
_SAMPLING_FIELDS = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    serving: ServingEngine,
    max_tokens: int | None,
    logprobs: int | None,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    """Modelfile defaults, then every field the client set; SamplingParams checks the values.

    max_tokens: the client's value, else the Modelfile's num_predict, else `default_max_tokens`
    (None: until the context is full, as vLLM does for chat)."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by minillm", "logit_bias")
    kwargs = serving.sampling_defaults()
    for field, target in _SAMPLING_FIELDS.items():
        value = getattr(req, field)
        if field in req.model_fields_set and value is not None:
            kwargs[target] = value
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    kwargs.setdefault("max_tokens", default_max_tokens)
    kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise from_value_error(e, set(type(req).model_fields)) from e


def usage_of(out: RequestOutput) -> UsageInfo:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    details = {"cached_tokens": out.metrics.num_cached_tokens}
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def finish_reason(c: CompletionOutput) -> str | None:
    return (
        None
        if c.finish_reason is None
        else "stop"
        if c.finish_reason == "abort"
        else c.finish_reason
    )


class _Logprobs:
    """The engine's per-token {token_id: logprob} dicts in the two OpenAI layouts."""

    def __init__(self, tokenizer: Any) -> None:
        self.text = lru_cache(maxsize=65536)(lambda tid: tokenizer.decode([tid]))

    def chat(self, token_ids: list[int], dicts: list[dict[int, float]], top: int) -> dict:
        content = []
        for tid, d in zip(token_ids, dicts, strict=False):
            best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
            content.append(
                {
                    "token": self.text(tid),
                    "logprob": d.get(tid, float("-inf")),
                    "bytes": list(self.text(tid).encode()),
                    "top_logprobs": [
                        {"token": self.text(t), "logprob": lp, "bytes": list(self.text(t).encode())}
                        for t, lp in best
                    ],
                }
            )
        return {"content": content}

    def completion(
        self, token_ids: list[int], dicts: list[dict[int, float]], top: int, offset: int = 0
    ) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, d in zip(token_ids, dicts, strict=False):
            tokens.append(self.text(tid))
            lps.append(d.get(tid))
            best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
            tops.append({self.text(t): lp for t, lp in best} if top else None)
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class _Choices:
    """Remembers how much of each choice was already sent, so chunks carry only what is new."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[int, int]] = {}
        self.done: set[int] = set()

    def new(self, out: RequestOutput) -> list[tuple[CompletionOutput, str, list[int], int, bool]]:
        """(choice, new text, new token ids, index of the first new token, first time seen)."""
        found = []
        for c in out.outputs:
            if c.index in self.done:
                continue
            first = c.index not in self.sent
            t0, k0 = self.sent.get(c.index, (0, 0))
            self.sent[c.index] = (len(c.text), len(c.token_ids))
            if c.finish_reason is not None:
                self.done.add(c.index)
            found.append((c, c.text[t0:], c.token_ids[k0:], k0, first))
        return found


def openai_router(serving: ServingEngine) -> APIRouter:
    router = APIRouter()
    logprob_fmt = _Logprobs(serving.llm.tokenizer)

    # ------------------------------------------------------------------ models
    @router.get("/v1/models")
    async def list_models() -> ModelList:
        created = int(serving.started_at)
        return ModelList(
            data=[
                ModelCard(
                    id=n,
                    created=created,
                    root=str(serving.llm.loaded.path),
                    max_model_len=serving.max_model_len,
                )
                for n in serving.names
            ]
        )

    # ------------------------------------------------------------------ chat
    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        model = serving.check_model(req.model)
        serving.check_ready()
        if req.tools:
            raise bad_request("tools (function calling) are not supported by minillm", "tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise bad_request(
                "response_format other than text is not supported by minillm", "response_format"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        top = req.top_logprobs or 0
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        params = build_sampling_params(req, serving, max_tokens, top if req.logprobs else None)
        prompt = serving.chat_prompt(req.messages)
        ids = serving.encode(prompt, params.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            opts = req.stream_options
            return StreamingResponse(
                _stream_chat(
                    serving,
                    logprob_fmt,
                    ids,
                    params,
                    rid,
                    model,
                    created,
                    bool(opts and opts.include_usage),
                    req.logprobs,
                    top,
                ),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        out = await _run(serving, ids, params, rid, request)
        choices = [
            ChatCompletionChoice(
                index=c.index,
                message=ChatMessage(content=c.text),
                finish_reason=finish_reason(c),
                stop_reason=c.stop_reason,
                logprobs=logprob_fmt.chat(c.token_ids, c.logprobs or [], top)
                if req.logprobs
                else None,
            )
            for c in out.outputs
        ]
        return ChatCompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage_of(out)
        )

    # ------------------------------------------------------------------ completions
    @router.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        model = serving.check_model(req.model)
        serving.check_ready()
        if req.suffix:
            raise bad_request("suffix is not supported by minillm", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (minillm returns every sequence)", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request(
                "echo with logprobs needs prompt logprobs, which minillm does not compute", "echo"
            )
        asked = req.max_tokens if "max_tokens" in req.model_fields_set else None
        params = build_sampling_params(req, serving, asked, req.logprobs, default_max_tokens=16)
        prompts = _prompt_list(req.prompt)
        ids = [serving.encode(p, params.max_tokens, param="prompt") for p in prompts]
        texts = [p if isinstance(p, str) else serving.llm.tokenizer.decode(p) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            opts = req.stream_options
            return StreamingResponse(
                _stream_completion(
                    serving,
                    logprob_fmt,
                    ids,
                    texts,
                    params,
                    rid,
                    model,
                    created,
                    bool(opts and opts.include_usage),
                    req,
                ),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        outs = await asyncio.gather(
            *(_run(serving, p, params, f"{rid}-{i}", request) for i, p in enumerate(ids))
        )
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(outs):
            usage = usage_of(out)
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            for c in out.outputs:
                lp = (
                    logprob_fmt.completion(c.token_ids, c.logprobs or [], req.logprobs)
                    if req.logprobs is not None
                    else None
                )
                choices.append(
                    CompletionChoice(
                        index=i * params.n + c.index,
                        text=(texts[i] if req.echo else "") + c.text,
                        logprobs=lp,
                        finish_reason=finish_reason(c),
                        stop_reason=c.stop_reason,
                    )
                )
        usage = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        )

    # ------------------------------------------------------------------ embeddings
    @router.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
        model = serving.check_model(req.model)
        serving.check_ready()
        hidden = serving.llm.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise bad_request(
                f"dimensions must be {hidden} (this model's hidden size) or unset", "dimensions"
            )
        inputs = _prompt_list(req.input, what="input")
        ids = [_embedding_ids(serving, x) for x in inputs]
        vectors = await asyncio.to_thread(embed_many, serving.llm.loaded.model, ids)
        data = [
            EmbeddingData(index=i, embedding=_encode_vector(v, req.encoding_format))
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(x) for x in ids)
        return EmbeddingResponse(
            data=data, model=model, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
        )

    return router


# ---------------------------------------------------------------------------- helpers
def _prompt_list(prompt: Any, what: str = "prompt") -> list[str | list[int]]:
    """A str, a list of str, a list of token ids, or a list of those -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request(f"{what} is empty", what)
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _embedding_ids(serving: ServingEngine, x: str | list[int]) -> list[int]:
    ids = serving.llm.tokenizer.encode(x) if isinstance(x, str) else list(x)
    if not ids:
        raise bad_request("cannot embed an empty input: it has no tokens", "input")
    if len(ids) > serving.max_model_len:
        raise bad_request(
            f"an input is {len(ids)} tokens long, but this model's context length "
            f"is {serving.max_model_len} tokens",
            "input",
        )
    return ids


def _encode_vector(v: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
    return v


async def _run(
    serving: ServingEngine, ids: list[int], params: SamplingParams, rid: str, request: Request
) -> RequestOutput:
    try:
        return await serving.generate_to_end(ids, params, rid, request)
    except ValueError as e:  # the engine refused it (a check we did not foresee)
        raise bad_request(str(e)) from e


async def _guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the stream started become an error event; [DONE] always ends it."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield sse(openai_error(e.status, e.message, e.param))
    except ValueError as e:
        yield sse(openai_error(400, str(e)))
    except Exception as e:  # noqa: BLE001 - a stream must end cleanly whatever happened
        yield sse(openai_error(500, f"internal server error: {e!r}"))
    yield sse("[DONE]")


def _stream_chat(
    serving: ServingEngine,
    fmt: _Logprobs,
    ids: list[int],
    params: SamplingParams,
    rid: str,
    model: str,
    created: int,
    include_usage: bool,
    want_logprobs: bool,
    top: int,
) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        choices, final = _Choices(), None
        gen = serving.generate(ids, params, rid)
        try:
            async for out in gen:
                final = out
                for c, text, new_ids, k0, first in choices.new(out):
                    if first:
                        yield sse(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": c.index,
                                        "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    reason = finish_reason(c)
                    if not (text or reason or (want_logprobs and new_ids)):
                        continue
                    lp = fmt.chat(new_ids, (c.logprobs or [])[k0:], top) if want_logprobs else None
                    choice = {
                        "index": c.index,
                        "delta": {"content": text} if text else {},
                        "logprobs": lp,
                        "finish_reason": reason,
                    }
                    if reason:
                        choice["stop_reason"] = c.stop_reason
                    yield sse({**base, "choices": [choice]})
        finally:
            await gen.aclose()
        if include_usage and final is not None:
            yield sse({**base, "choices": [], "usage": usage_of(final).model_dump()})

    return _guard(events())


def _stream_completion(
    serving: ServingEngine,
    fmt: _Logprobs,
    ids: list[list[int]],
    texts: list[str],
    params: SamplingParams,
    rid: str,
    model: str,
    created: int,
    include_usage: bool,
    req: CompletionRequest,
) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        trackers = [_Choices() for _ in ids]
        finals: dict[int, RequestOutput] = {}
        gens = [serving.generate(p, params, f"{rid}-{i}") for i, p in enumerate(ids)]
        offsets: dict[tuple[int, int], int] = {}
        try:
            async for i, out in _merge(gens):
                finals[i] = out
                for c, text, new_ids, k0, first in trackers[i].new(out):
                    index = i * params.n + c.index
                    if first and req.echo:
                        text = texts[i] + text
                    reason = finish_reason(c)
                    if not (text or reason or (req.logprobs is not None and new_ids)):
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp = fmt.completion(
                            new_ids,
                            (c.logprobs or [])[k0:],
                            req.logprobs,
                            offsets.get((i, c.index), 0),
                        )
                        offsets[(i, c.index)] = offsets.get((i, c.index), 0) + len(text)
                    yield sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": index,
                                    "text": text,
                                    "logprobs": lp,
                                    "finish_reason": reason,
                                    **({"stop_reason": c.stop_reason} if reason else {}),
                                }
                            ],
                        }
                    )
        finally:
            for g in gens:
                await g.aclose()
        if include_usage and finals:
            prompt = sum(len(o.prompt_token_ids) for o in finals.values())
            completion = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
            usage = UsageInfo(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
            yield sse({**base, "choices": [], "usage": usage.model_dump()})

    return _guard(events())


async def _merge(
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
