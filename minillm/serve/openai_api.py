"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Each handler checks the request (model, sampling values, n, the prompt against the context),
is admitted for the sequences it will run, then either streams (openai_stream.py) or waits for
the final output. Everything that can be refused is refused before a response starts.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from minillm.engine.outputs import RequestOutput
from minillm.sampling import RequestOutputKind, SamplingParams
from minillm.serve.admission import AdmittedStreamingResponse
from minillm.serve.engine_client import ServingDep, ServingEngine
from minillm.serve.errors import bad_request, from_value_error
from minillm.serve.json_body import CheckedJSONRoute
from minillm.serve.openai_logprobs import chat_logprobs, completion_logprobs
from minillm.serve.openai_stream import (
    SSE_HEADERS,
    ChatStream,
    CompletionStream,
    finish_reason,
    usage_of,
)
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

router = APIRouter(route_class=CheckedJSONRoute)

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


def build_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    serving: ServingEngine,
    max_tokens: int | None,
    logprobs: int | None,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    """Modelfile defaults, then every field the client set; SamplingParams checks the values.

    max_tokens: the client's value, else the Modelfile's num_predict, else `default_max_tokens`
    (None: until the context is full, as vLLM does for chat). Streams get DELTA outputs,
    other requests one FINAL_ONLY output."""
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
    # a stream sends what each step adds; a reply waits for the end
    kwargs["output_kind"] = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise from_value_error(e, set(type(req).model_fields)) from e
    serving.check_n(params.n)
    return params


# ---------------------------------------------------------------------------- models
@router.get("/v1/models")
async def list_models(serving: ServingDep) -> ModelList:
    created = int(serving.started_at)
    return ModelList(
        data=[
            ModelCard(id=n, created=created, root=n, max_model_len=serving.max_model_len)
            for n in serving.names
        ]
    )


# ---------------------------------------------------------------------------- chat
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, serving: ServingDep
) -> Any:
    model = serving.check_model(req.model)
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
    serving.check_ready()  # values first (a 400 is final), then whether there is room now
    prompt = await serving.chat_prompt(req.messages)
    ids = await serving.encode(prompt, params.max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        opts = req.stream_options
        stream = ChatStream(
            serving,
            ids,
            params,
            rid,
            model,
            created,
            include_usage=bool(opts and opts.include_usage),
            want_logprobs=req.logprobs,
            top=top,
        )
        return AdmittedStreamingResponse(
            stream.events(),
            serving.admit(params.n),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    with serving.admit(params.n):
        out = await _run(serving, ids, params, rid, request)
    choices = [
        ChatCompletionChoice(
            index=c.index,
            message=ChatMessage(content=c.text),
            finish_reason=finish_reason(c),
            stop_reason=c.stop_reason,
            logprobs=chat_logprobs(serving.token_text, c.token_ids, c.logprobs or [], top)
            if req.logprobs
            else None,
        )
        for c in out.outputs
    ]
    return ChatCompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=usage_of([out])
    )


# ---------------------------------------------------------------------------- completions
@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request, serving: ServingDep) -> Any:
    model = serving.check_model(req.model)
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
    prompts = prompt_list(req.prompt)
    sequences, what = len(prompts) * params.n, f" ({len(prompts)} prompts x n={params.n})"
    serving.check_fits(sequences, what)  # before tokenizing thousands of prompts
    serving.check_ready()
    ids = [await serving.encode(p, params.max_tokens, param="prompt") for p in prompts]
    texts = [p if isinstance(p, str) else serving.llm.tokenizer.decode(p) for p in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    admission = serving.admit(sequences, what)
    if req.stream:
        opts = req.stream_options
        stream = CompletionStream(
            serving,
            ids,
            texts,
            params,
            rid,
            model,
            created,
            include_usage=bool(opts and opts.include_usage),
            echo=req.echo,
            logprobs=req.logprobs,
        )
        return AdmittedStreamingResponse(
            stream.events(), admission, media_type="text/event-stream", headers=SSE_HEADERS
        )
    with admission:
        outs = await _run_all(serving, ids, params, rid, request)
    choices = []
    for i, out in enumerate(outs):
        for c in out.outputs:
            lp = (
                completion_logprobs(serving.token_text, c.token_ids, c.logprobs or [], req.logprobs)
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
    usage = usage_of(outs)
    usage.prompt_tokens_details = None
    return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)


# ---------------------------------------------------------------------------- embeddings
@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, serving: ServingDep) -> EmbeddingResponse:
    model = serving.check_model(req.model)
    serving.check_ready()
    hidden = serving.llm.config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise bad_request(
            f"dimensions must be {hidden} (this model's hidden size) or unset", "dimensions"
        )
    inputs = prompt_list(req.input, what="input")
    ids = [await _embedding_ids(serving, x) for x in inputs]
    vectors = await serving.embed(ids)
    data = [
        EmbeddingData(index=i, embedding=_encode_vector(v, req.encoding_format))
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(x) for x in ids)
    return EmbeddingResponse(
        data=data, model=model, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
    )


# ---------------------------------------------------------------------------- helpers
def prompt_list(prompt: Any, what: str = "prompt") -> list[str | list[int]]:
    """A str, a list of str, a list of token ids, or a list of those -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request(f"{what} is empty", what)
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


async def _embedding_ids(serving: ServingEngine, x: str | list[int]) -> list[int]:
    limit = serving.max_model_len
    count, ids = await serving.tokenize(x, limit) if isinstance(x, str) else (len(x), list(x))
    if not count:
        raise bad_request("cannot embed an empty input: it has no tokens", "input")
    if count > limit:
        raise bad_request(
            f"an input is {count} tokens long, but this model's context length is {limit} tokens",
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


async def _run_all(
    serving: ServingEngine,
    ids: list[list[int]],
    params: SamplingParams,
    rid: str,
    request: Request,
) -> list[RequestOutput]:
    runs = (_run(serving, p, params, f"{rid}-{i}", request) for i, p in enumerate(ids))
    return list(await asyncio.gather(*runs))
