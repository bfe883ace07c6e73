"""The server: one FastAPI app, one model, one AsyncLLMEngine batching every live request.

    app = build_app(llm, api_key="sk-...", served_model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `minillm serve` does
    with run_in_thread(app, port=free_port) as server:    # tests and notebooks
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-...")

Routes: OpenAI /v1/* (openai_api.py), Ollama /api/* (ollama_api.py), /metrics (Prometheus),
/health, /version. A request passes these layers, outermost first, each refusing with an
error shaped like the API it asked for:

1. browser_guard.py: foreign web origins and DNS-rebinding Host names (403), non-JSON bodies
   (415); CORS headers for allowed origins;
2. auth.py: with an API key, everything but the probes (/, /health, /version, /api/version)
   needs `Authorization: Bearer KEY` (401), the API docs and /metrics included;
3. body_limit.py: bodies over `max_body_bytes` (413);
4. the routes: JSON parsed and checked off the event loop (json_body.py), then each API's own
   checks (400/404/422), admission for the sequences a request runs (503 when overloaded).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import minillm
from minillm.chat_sandbox import RENDER_TIMEOUT
from minillm.hub.modelfile import Modelfile
from minillm.llm import LLM
from minillm.serve.auth import APIKeyMiddleware
from minillm.serve.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from minillm.serve.browser_guard import BrowserGuardMiddleware, OriginPolicy, PolicyCORSMiddleware
from minillm.serve.engine_client import DEFAULT_MAX_N, ServingEngine
from minillm.serve.errors import install_error_handlers
from minillm.serve.model_facts import public_model_name
from minillm.serve.ollama_api import router as ollama_router
from minillm.serve.openai_api import router as openai_router
from minillm.serve.pd_setup import install_disaggregation


def build_app(
    llm: LLM,
    *,
    api_key: str | None = None,
    served_model_name: str | Sequence[str] | None = None,
    profile: Modelfile | None = None,
    max_queued_requests: int = 512,
    max_n: int = DEFAULT_MAX_N,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
    template_timeout: float = RENDER_TIMEOUT,
    disaggregation_mode: str = "null",
    prefill_url: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `llm`. The engine thread starts and stops with the app's lifespan
    (so a TestClient used without `with` sees a 503 "not running").

    max_queued_requests: sequences in flight before new requests get a 503 (n=4 counts 4).
    max_n: the largest `n` a request may ask for. max_body_bytes: larger bodies get a 413.
    allowed_origins: web origins allowed besides loopback ones (see browser_guard.py; the
    MINILLM_ORIGINS environment variable adds more). template_timeout: seconds a user-supplied
    template (Ollama's `template`, a Modelfile's TEMPLATE) may take to render.
    disaggregation_mode: "null" (one server does everything), "prefill" (also answer a decode
    server's /internal/pd/* requests) or "decode" (compute every prompt on the prefill server
    at `prefill_url`); see pd_setup.py.
    """
    aliases: list[str] = []
    if served_model_name is None:  # the model as loaded; a path is shown by its last part
        served_model_name = public_model_name(llm.loaded.name)
        if served_model_name != llm.loaded.name:
            aliases.append(llm.loaded.name)
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    serving = ServingEngine(
        llm,
        names,
        profile,
        max_queued_requests=max_queued_requests,
        max_n=max_n,
        template_timeout=template_timeout,
        aliases=aliases,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        serving.start()
        # What exists now (the model, the libraries) lives as long as the server: freeze it,
        # so the collector's full passes, which pause every thread, do not walk it again and
        # again (in benchmarks/probe_bad_input.py one took 0.2 s). Unfrozen at shutdown.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            serving.shutdown()
            if serving.prefill_client is not None:
                serving.prefill_client.close()
            gc.unfreeze()

    app = FastAPI(title="minillm", version=minillm.__version__, lifespan=lifespan)
    app.state.serving = serving
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(ollama_router)
    install_disaggregation(app, serving, disaggregation_mode, prefill_url, api_key)

    @app.get("/health")
    async def health() -> Response:
        if serving.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": minillm.__version__}

    @app.get("/")
    async def root() -> Response:  # Ollama clients probe "/" for "... is running"
        return PlainTextResponse("minillm is running")

    # added innermost first: the last one added runs first
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    policy = OriginPolicy(allowed_origins)
    app.add_middleware(PolicyCORSMiddleware, policy=policy)
    app.add_middleware(BrowserGuardMiddleware, policy=policy)
    return app


# ---------------------------------------------------------------------------- running it
@dataclass
class BackgroundServer:
    """A uvicorn server on a daemon thread; `url` is its base address."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, timeout: float = 60
) -> BackgroundServer:
    """Start `app` with uvicorn on a thread and wait until it accepts requests."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"minillm-serve-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} failed to start (see its log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server on {host}:{port} did not start in {timeout} s")
        time.sleep(0.02)
    return BackgroundServer(server, thread, f"http://{host}:{port}")


@contextlib.contextmanager
def run_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000
) -> Iterator[BackgroundServer]:
    """`with run_in_thread(app, port=p) as server:` ... the server stops on exit."""
    server = start_in_thread(app, host, port)
    try:
        yield server
    finally:
        server.stop()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve in the foreground until Ctrl+C (what `minillm serve` runs)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
