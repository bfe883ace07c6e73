"""The prefill server's internal endpoints (`minillm serve MODEL --disaggregation-mode prefill`).

A decode server (serve/pd_decode.py) posts each request's prompt token ids and sampling
parameters here; this server runs the prompt through its own engine like any request (batched
with others, chunked, prefix-cached: a second prompt that shares a prefix hits this server's
cache), stops after the first token, and answers with the first token and the prompt's K/V as a
binary stream (parallel/pd_transfer.py). The request's blocks are then freed, their full ones
kept in the prefix cache.

    GET  /internal/pd/info      the model's identity and K/V layout (checked at the decode
                                server's start-up)
    POST /internal/pd/prefill   one prompt -> application/x-minillm-kv stream

These are not a public API: they exist only in prefill mode, are left out of the OpenAPI docs,
need the header `X-Minillm-PD: decode` (so no OpenAI or Ollama client reaches them by mistake),
and sit behind the API key like every other path when the server has one (the decode server
sends its own --api-key, so a pair shares one key). The public APIs keep working on a prefill
server too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from minillm.engine.llm_engine import PromptError
from minillm.engine.prefilled import PrefilledPrompt
from minillm.parallel.pd_transfer import KV_MEDIA_TYPE, encode_prefilled
from minillm.sampling import SamplingParams
from minillm.serve.engine_client import ServingDep
from minillm.serve.errors import APIError, bad_request, from_value_error
from minillm.serve.metrics import ServerMetrics
from minillm.serve.pd_protocol import PD_HEADER, PD_HEADER_VALUE, PDIdentity


class PrefillBody(BaseModel):
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    fingerprint: str
    request_id: str


router = APIRouter(prefix="/internal/pd", include_in_schema=False)


def _check_caller(marker: str | None) -> None:
    if marker != PD_HEADER_VALUE:
        raise APIError(
            403,
            "this is a prefill server's internal endpoint, for its decode server only "
            f"(header {PD_HEADER}: {PD_HEADER_VALUE}); clients use /v1 or /api",
        )


@router.get("/info")
async def info(
    request: Request, marker: str | None = Header(None, alias=PD_HEADER)
) -> dict[str, Any]:
    _check_caller(marker)
    return request.app.state.pd_identity.as_json()


@router.post("/prefill", response_model=None)
async def prefill(
    body: PrefillBody,
    request: Request,
    serving: ServingDep,
    marker: str | None = Header(None, alias=PD_HEADER),
) -> StreamingResponse:
    _check_caller(marker)
    ident: PDIdentity = request.app.state.pd_identity
    if body.fingerprint != ident.fingerprint:
        raise APIError(
            409,
            f"the prefill server serves {ident.model!r} (model sha256 {ident.fingerprint[:12]}…) "
            f"but the decode server's model is sha256 {body.fingerprint[:12]}…: a pair must "
            "load the same model file",
        )
    try:
        params = SamplingParams(**body.sampling)
    except (TypeError, ValueError) as e:
        raise from_value_error(e) from e
    try:
        serving.engine.check_prompt(body.prompt_token_ids)
    except PromptError as e:
        raise bad_request(str(e), "prompt_token_ids") from e
    with serving.admit(1):
        try:
            pre = await serving.async_engine.prefill(
                body.prompt_token_ids, params, f"pd-{body.request_id}"
            )
        except PromptError as e:
            raise bad_request(str(e), "prompt_token_ids") from e
        except ValueError as e:
            raise from_value_error(e) from e
    # a sync iterator: Starlette sends it from a worker thread, off the event loop
    return StreamingResponse(_metered(pre, serving.metrics), media_type=KV_MEDIA_TYPE)


def _metered(pre: PrefilledPrompt, metrics: ServerMetrics) -> Iterator[bytes]:
    """The stream's frames; once the end frame is handed to the socket, the K/V bytes (the
    formula's count: frame headers and generator state excluded) and the time are recorded."""
    t0 = time.perf_counter()
    yield from encode_prefilled(pre)
    metrics.observe_kv_transfer(pre.nbytes, time.perf_counter() - t0)
