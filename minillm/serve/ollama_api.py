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

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import minillm
from minillm.engine.outputs import RequestOutput
from minillm.hub.modelfile import compile_template, convert_parameter, sampling_kwargs
from minillm.sampling import SamplingParams
from minillm.serve.embeddings import embed_many
from minillm.serve.engine_client import ServingEngine
from minillm.serve.errors import APIError, bad_request, from_value_error
from minillm.serve.protocol import (
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)

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


def make_params(kwargs: dict[str, Any], prompt_len: int, limit: int) -> SamplingParams:
    """SamplingParams with max_tokens clamped to what fits in the context (Ollama stops there)."""
    room = limit - prompt_len
    kwargs = dict(kwargs)
    kwargs["max_tokens"] = (
        room if kwargs.get("max_tokens") is None else min(kwargs["max_tokens"], room)
    )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise from_value_error(e) from e


class _ModelFacts:
    """What /api/tags, /api/show and /api/ps say about the served model (read once)."""

    def __init__(self, serving: ServingEngine) -> None:
        self.serving = serving

    @cached_property
    def facts(self) -> dict[str, Any]:
        from minillm.hub.info import describe
        from minillm.hub.ref import ref_for_path

        loaded = self.serving.llm.loaded
        return describe(ref_for_path(loaded.path, name=self.serving.model_name))

    @cached_property
    def digest(self) -> str:
        f = self.facts
        return hashlib.sha256(f"{f['path']}:{f['size']}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        f = self.facts
        return {
            "parent_model": self.serving.profile.from_ if self.serving.profile else "",
            "format": f["format"],
            "family": f["architecture"],
            "families": [f["architecture"]],
            "parameter_size": f["parameter_size"],
            "quantization_level": str(f["quantization"]),
        }

    def model_info(self) -> dict[str, Any]:
        f, arch = self.facts, self.facts["architecture"]
        info = {"general.architecture": arch, "general.parameter_count": f["parameters"]}
        for key, name in (
            ("context_length", "context_length"),
            ("embedding_length", "embedding_length"),
            ("block_count", "layers"),
            ("attention.head_count", "heads"),
            ("attention.head_count_kv", "kv_heads"),
            ("vocab_size", "vocab_size"),
        ):
            if f.get(name) is not None:
                info[f"{arch}.{key}"] = f[name]
        return info

    def modified_at(self) -> str:
        path = self.serving.llm.loaded.path
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()


def ollama_router(serving: ServingEngine) -> APIRouter:
    router = APIRouter()
    facts = _ModelFacts(serving)

    def load_reply(model: str, chat: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return {**body, "done": True, "done_reason": "load"}

    def final_fields(out: RequestOutput, started: float) -> dict[str, Any]:
        m, c = out.metrics, out.outputs[0]
        return {
            "done": True,
            "done_reason": c.finish_reason or "stop",
            "total_duration": ns(time.perf_counter() - started),
            "load_duration": 0,
            "prompt_eval_count": m.num_prompt_tokens,
            "prompt_eval_duration": ns(m.prompt_eval_duration),
            "eval_count": m.num_generation_tokens,
            "eval_duration": ns(m.eval_duration),
        }

    async def respond(
        ids: list[int],
        params: SamplingParams,
        model: str,
        chat: bool,
        stream: bool,
        request: Request,
        context: bool,
    ) -> Any:
        started = time.perf_counter()
        rid = f"ollama-{uuid.uuid4().hex}"

        def piece(text: str) -> dict[str, Any]:
            return (
                {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            )

        def extra(out: RequestOutput) -> dict[str, Any]:
            if not context:
                return {}
            return {"context": list(out.prompt_token_ids) + list(out.outputs[0].token_ids)}

        if not stream:
            try:
                out = await serving.generate_to_end(ids, params, rid, request)
            except ValueError as e:
                raise bad_request(str(e)) from e
            return {
                "model": model,
                "created_at": now_rfc3339(),
                **piece(out.outputs[0].text),
                **final_fields(out, started),
                **extra(out),
            }

        async def lines() -> AsyncIterator[str]:
            sent, final = 0, None
            gen = serving.generate(ids, params, rid)
            try:
                async for out in gen:
                    final, text = out, out.outputs[0].text
                    if len(text) > sent:
                        yield _line(
                            {
                                "model": model,
                                "created_at": now_rfc3339(),
                                **piece(text[sent:]),
                                "done": False,
                            }
                        )
                        sent = len(text)
            except APIError as e:
                yield _line({"error": e.message})
                return
            except Exception as e:  # noqa: BLE001 - the stream must end with a readable line
                yield _line({"error": str(e) or repr(e)})
                return
            finally:
                await gen.aclose()
            if final is not None:
                yield _line(
                    {
                        "model": model,
                        "created_at": now_rfc3339(),
                        **piece(""),
                        **final_fields(final, started),
                        **extra(final),
                    }
                )

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # ------------------------------------------------------------------ generate / chat
    @router.post("/api/generate", response_model=None)
    async def generate(req: OllamaGenerateRequest, request: Request) -> Any:
        model = serving.check_model(req.model, required=True)
        serving.check_ready()
        _unsupported(images=req.images, format=req.format)
        if not req.prompt and not req.context:
            return load_reply(model, chat=False)
        kwargs, num_ctx = parse_options(req.options, serving)
        if req.raw:
            prompt = req.prompt
        else:
            messages = [{"role": "system", "content": req.system}] if req.system else []
            messages.append({"role": "user", "content": req.prompt})
            if req.template:
                try:
                    render = compile_template(req.template).render
                    prompt = render(
                        serving.profile.conversation(messages) if serving.profile else messages
                    )
                except ValueError as e:
                    raise bad_request(f"template: {e}", "template") from e
            else:
                prompt = serving.chat_prompt(messages)
        ids = (req.context or []) + (serving.llm.tokenizer.encode(prompt) if prompt else [])
        ids = serving.encode(ids, None, num_ctx, param="prompt")
        limit = min(serving.max_model_len, num_ctx or serving.max_model_len)
        params = make_params(kwargs, len(ids), limit)
        return await respond(ids, params, model, False, req.stream, request, context=not req.raw)

    @router.post("/api/chat", response_model=None)
    async def chat(req: OllamaChatRequest, request: Request) -> Any:
        model = serving.check_model(req.model, required=True)
        serving.check_ready()
        _unsupported(format=req.format, tools=req.tools)
        if not req.messages:
            return load_reply(model, chat=True)
        for i, m in enumerate(req.messages):
            if isinstance(m, dict) and m.get("images"):
                raise bad_request(
                    f"messages[{i}].images: images are not supported by minillm", "messages"
                )
        kwargs, num_ctx = parse_options(req.options, serving)
        prompt = serving.chat_prompt(req.messages)
        ids = serving.encode(prompt, None, num_ctx)
        limit = min(serving.max_model_len, num_ctx or serving.max_model_len)
        params = make_params(kwargs, len(ids), limit)
        return await respond(ids, params, model, True, req.stream, request, context=False)

    # ------------------------------------------------------------------ embeddings
    @router.post("/api/embed")
    async def embed(req: OllamaEmbedRequest) -> dict[str, Any]:
        started = time.perf_counter()
        model = serving.check_model(req.model, required=True)
        serving.check_ready()
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        limit = serving.max_model_len
        ids = []
        for i, text in enumerate(inputs):
            tokens = serving.llm.tokenizer.encode(text)
            if not tokens:
                raise bad_request(f"input[{i}] is empty: it has no tokens", "input")
            if len(tokens) > limit:
                if not req.truncate:
                    raise bad_request(
                        f"input[{i}] is {len(tokens)} tokens long, more than the "
                        f"context length {limit} (set truncate to true to cut it)",
                        "input",
                    )
                tokens = tokens[:limit]
            ids.append(tokens)
        vectors = await asyncio.to_thread(embed_many, serving.llm.loaded.model, ids)
        return {
            "model": model,
            "embeddings": vectors,
            "total_duration": ns(time.perf_counter() - started),
            "load_duration": 0,
            "prompt_eval_count": sum(len(x) for x in ids),
        }

    # ------------------------------------------------------------------ about the model
    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        f = facts.facts
        return {
            "models": [
                {
                    "name": n,
                    "model": n,
                    "modified_at": facts.modified_at(),
                    "size": f["size"],
                    "digest": facts.digest,
                    "details": facts.details(),
                }
                for n in serving.names
            ]
        }

    @router.post("/api/show")
    async def show(req: OllamaShowRequest) -> dict[str, Any]:
        model = serving.check_model(req.model or req.name, required=True)
        profile, f = serving.profile, facts.facts
        template = (
            profile.template
            if profile and profile.template
            else serving.llm.loaded.chat_template.source
        )
        body = {
            "modelfile": profile.to_text() if profile else f"FROM {f['path']}\n",
            "parameters": profile.parameters_text() if profile else "",
            "template": template,
            "details": facts.details(),
            "model_info": facts.model_info(),
            "capabilities": ["completion", "embedding"],
            "modified_at": facts.modified_at(),
        }
        if profile and profile.system:
            body["system"] = profile.system
        license_text = (
            "\n\n".join(profile.license) if profile and profile.license else f.get("license")
        )
        if license_text:
            body["license"] = license_text
        body["model"] = model
        return body

    @router.get("/api/ps")
    async def ps() -> dict[str, Any]:
        f = facts.facts
        kv = serving.engine.kv_cache.nbytes
        expires = (datetime.now(UTC) + timedelta(days=365 * 100)).isoformat()
        return {
            "models": [
                {
                    "name": n,
                    "model": n,
                    "size": f["size"] + kv,
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

    return router


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
