"""The Ollama-compatible API: /api/generate, /api/chat, /api/embed, /api/tags, /api/show, /api/ps,
/api/version (see Ollama's docs/api.md).

Streaming is NDJSON (one JSON object per line), on by default as in Ollama; `"stream": false`
returns one object. The last object has `done: true`, `done_reason` and the timings, all in
nanoseconds: total_duration (request received -> done), load_duration (0: the model was loaded
before the server started listening), prompt_eval_count / prompt_eval_duration (the prompt's
tokens; arrival -> first token, queueing included) and eval_count / eval_duration (generated
tokens; first token -> last). eval_count / eval_duration * 1e9 is the decode speed.

`options` take Ollama's names (num_predict, num_ctx, temperature, top_k, top_p, min_p,
repeat_penalty, presence_penalty, frequency_penalty, seed, stop); defaults are Ollama's, then a
Modelfile's PARAMETERs, then the request's options.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request

import minillm
from minillm.engine.outputs import RequestOutput
from minillm.hub.modelfile import convert_parameter, sampling_kwargs
from minillm.sampling import RequestOutputKind, SamplingParams
from minillm.serve.admission import AdmittedStreamingResponse
from minillm.serve.engine_client import ServingDep, ServingEngine
from minillm.serve.errors import APIError, bad_request, from_value_error, internal_error
from minillm.serve.json_body import CheckedJSONRoute
from minillm.serve.protocol import (
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)

router = APIRouter(route_class=CheckedJSONRoute)

# Ollama's own defaults (docs/modelfile.md), used where neither a Modelfile nor the request
# says otherwise. repeat_penalty there looks back 64 tokens; minillm's covers the whole context.
OLLAMA_DEFAULTS = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
    "num_predict": 128,
}
NS = 1_000_000_000


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    return 0 if seconds is None else max(0, int(seconds * NS))


def parse_options(
    options: dict[str, Any] | None, serving: ServingEngine
) -> tuple[dict, int | None]:
    """Ollama defaults < Modelfile PARAMETERs < request options -> (SamplingParams kwargs, num_ctx)."""
    merged: dict[str, Any] = dict(OLLAMA_DEFAULTS)
    if serving.profile is not None:
        merged.update(serving.profile.parameters)
    for name, value in (options or {}).items():
        try:
            merged[name] = convert_parameter(name, value)
        except ValueError as e:
            raise bad_request(f"options.{name}: {e}", f"options.{name}") from e
    try:
        kwargs = sampling_kwargs(merged)
    except ValueError as e:
        raise bad_request(f"options: {e}", "options") from e
    num_ctx = merged.get("num_ctx")
    if num_ctx is not None and num_ctx < 2:
        raise bad_request(f"options.num_ctx must be at least 2, got {num_ctx}", "options.num_ctx")
    return kwargs, num_ctx


def make_params(
    kwargs: dict[str, Any], prompt_len: int, limit: int, stream: bool
) -> SamplingParams:
    """SamplingParams with max_tokens clamped to what fits in the context (Ollama stops there);
    a stream gets DELTA outputs, a single reply one FINAL_ONLY output."""
    room = limit - prompt_len
    kwargs = dict(kwargs)
    kwargs["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    kwargs["max_tokens"] = (
        room if kwargs.get("max_tokens") is None else min(kwargs["max_tokens"], room)
    )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise from_value_error(e) from e


def load_reply(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers to an empty prompt: "the model is loaded"."""
    body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return {**body, "done": True, "done_reason": "load"}


def final_fields(out: RequestOutput, started: float) -> dict[str, Any]:
    m = out.metrics
    reason = out.outputs[0].finish_reason if out.outputs else None
    return {
        "done": True,
        "done_reason": reason or "stop",
        "total_duration": ns(time.perf_counter() - started),
        "load_duration": 0,
        "prompt_eval_count": m.num_prompt_tokens,
        "prompt_eval_duration": ns(m.prompt_eval_duration),
        "eval_count": m.num_generation_tokens,
        "eval_duration": ns(m.eval_duration),
    }


@dataclass
class Reply:
    """One /api/generate or /api/chat answer: streamed as NDJSON lines, or one object."""

    serving: ServingEngine
    ids: list[int]
    params: SamplingParams
    model: str
    chat: bool
    context: bool  # /api/generate returns the tokens as `context` for the next call
    started: float = field(default_factory=time.perf_counter)
    rid: str = field(default_factory=lambda: f"ollama-{uuid.uuid4().hex}")

    def piece(self, text: str) -> dict[str, Any]:
        if self.chat:
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def last(self, out: RequestOutput, text: str, generated: list[int]) -> dict[str, Any]:
        context = {"context": [*out.prompt_token_ids, *generated]} if self.context else {}
        return {
            "model": self.model,
            "created_at": now_rfc3339(),
            **self.piece(text),
            **final_fields(out, self.started),
            **context,
        }

    async def whole(self, request: Request) -> dict[str, Any]:
        try:
            out = await self.serving.generate_to_end(self.ids, self.params, self.rid, request)
        except ValueError as e:
            raise bad_request(str(e)) from e
        c = out.outputs[0]
        return self.last(out, c.text, c.token_ids)

    async def lines(self) -> AsyncIterator[str]:
        final, generated = None, []  # the answer's ids, for `context`
        gen = self.serving.generate(self.ids, self.params, self.rid)
        try:
            async for out in gen:
                final, text = out, out.outputs[0].text if out.outputs else ""
                generated += out.outputs[0].token_ids if out.outputs else []
                if text:
                    yield _line(
                        {
                            "model": self.model,
                            "created_at": now_rfc3339(),
                            **self.piece(text),
                            "done": False,
                        }
                    )
        except APIError as e:
            yield _line({"error": e.message})
            return
        except ValueError as e:
            yield _line({"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - the stream must end with a readable line
            yield _line({"error": internal_error("/api/chat" if self.chat else "/api/generate", e)})
            return
        finally:
            await gen.aclose()
        if final is not None:
            yield _line(self.last(final, "", generated))


async def respond(reply: Reply, stream: bool, request: Request) -> Any:
    """Admit the request, then stream it or wait for its end."""
    if stream:
        return AdmittedStreamingResponse(
            reply.lines(), reply.serving.admit(1), media_type="application/x-ndjson"
        )
    with reply.serving.admit(1):
        return await reply.whole(request)


# ---------------------------------------------------------------------------- generate / chat
@router.post("/api/generate", response_model=None)
async def generate(req: OllamaGenerateRequest, request: Request, serving: ServingDep) -> Any:
    model = serving.check_model(req.model, required=True)
    _unsupported(images=req.images, format=req.format)
    if not req.prompt and not req.context:
        serving.check_ready()
        return load_reply(model, chat=False)
    kwargs, num_ctx = parse_options(req.options, serving)
    serving.check_ready()
    if req.raw:
        prompt = req.prompt
    else:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        prompt = await serving.chat_prompt(messages, template=req.template)
    ids = await serving.encode(prompt, None, num_ctx, param="prompt", prefix=req.context or [])
    limit = min(serving.max_model_len, num_ctx or serving.max_model_len)
    params = make_params(kwargs, len(ids), limit, req.stream)
    reply = Reply(serving, ids, params, model, chat=False, context=not req.raw)
    return await respond(reply, req.stream, request)


@router.post("/api/chat", response_model=None)
async def chat(req: OllamaChatRequest, request: Request, serving: ServingDep) -> Any:
    model = serving.check_model(req.model, required=True)
    _unsupported(format=req.format, tools=req.tools)
    if not req.messages:
        serving.check_ready()
        return load_reply(model, chat=True)
    for i, m in enumerate(req.messages):
        if isinstance(m, dict) and m.get("images"):
            raise bad_request(
                f"messages[{i}].images: images are not supported by minillm", "messages"
            )
    kwargs, num_ctx = parse_options(req.options, serving)
    serving.check_ready()
    prompt = await serving.chat_prompt(req.messages)
    ids = await serving.encode(prompt, None, num_ctx)
    limit = min(serving.max_model_len, num_ctx or serving.max_model_len)
    params = make_params(kwargs, len(ids), limit, req.stream)
    reply = Reply(serving, ids, params, model, chat=True, context=False)
    return await respond(reply, req.stream, request)


# ---------------------------------------------------------------------------- embeddings
@router.post("/api/embed")
async def embed(req: OllamaEmbedRequest, serving: ServingDep) -> dict[str, Any]:
    started = time.perf_counter()
    model = serving.check_model(req.model, required=True)
    serving.check_ready()
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    limit = serving.max_model_len
    ids = []
    for i, text in enumerate(inputs):
        count, tokens = await serving.tokenize(text, limit)  # the first `limit` ids
        if not count:
            raise bad_request(f"input[{i}] is empty: it has no tokens", "input")
        if count > limit and not req.truncate:
            raise bad_request(
                f"input[{i}] is {count} tokens long, more than the context length {limit} "
                "(set truncate to true to cut it)",
                "input",
            )
        ids.append(tokens)
    vectors = await serving.embed(ids)
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": ns(time.perf_counter() - started),
        "load_duration": 0,
        "prompt_eval_count": sum(len(x) for x in ids),
    }


# ---------------------------------------------------------------------------- about the model
@router.get("/api/tags")
async def tags(serving: ServingDep) -> dict[str, Any]:
    facts = serving.facts
    return {
        "models": [
            {
                "name": n,
                "model": n,
                "modified_at": facts.modified_at(),
                "size": facts.size,
                "digest": facts.digest,
                "details": facts.details(),
            }
            for n in serving.names
        ]
    }


@router.post("/api/show")
async def show(req: OllamaShowRequest, serving: ServingDep) -> dict[str, Any]:
    model = serving.check_model(req.model or req.name, required=True)
    profile, facts = serving.profile, serving.facts
    template = (
        profile.template
        if profile and profile.template
        else serving.llm.loaded.chat_template.source
    )
    body = {
        "modelfile": facts.modelfile(),
        "parameters": profile.parameters_text() if profile else "",
        "template": template,
        "details": facts.details(),
        "model_info": facts.model_info(),
        "capabilities": ["completion", "embedding"],
        "modified_at": facts.modified_at(),
    }
    if profile and profile.system:
        body["system"] = profile.system
    license_text = facts.license()
    if license_text:
        body["license"] = license_text
    body["model"] = model
    return body


@router.get("/api/ps")
async def ps(serving: ServingDep) -> dict[str, Any]:
    facts = serving.facts
    kv = serving.engine.kv_cache.nbytes
    expires = (datetime.now(UTC) + timedelta(days=365 * 100)).isoformat()
    return {
        "models": [
            {
                "name": n,
                "model": n,
                "size": facts.size + kv,
                "digest": facts.digest,
                "details": facts.details(),
                "expires_at": expires,
                "size_vram": 0,
                "context_length": serving.max_model_len,
            }
            for n in serving.names
        ]
    }


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": minillm.__version__}


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _unsupported(**fields: Any) -> None:
    what = {
        "images": "images",
        "format": "format (JSON mode / structured outputs)",
        "tools": "tools (function calling)",
    }
    for name, value in fields.items():
        if value:
            raise bad_request(f"{what[name]} is not supported by minillm", name)
