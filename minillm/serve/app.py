"""The server: one FastAPI app, one model, one AsyncLLMEngine batching every live request.

    app = build_app(llm, api_key="sk-...", served_model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `minillm serve` does
    with run_in_thread(app, port=free_port) as server:    # tests and notebooks
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-...")

Routes: OpenAI /v1/* (openai_api.py), Ollama /api/* (ollama_api.py), /metrics (Prometheus),
/health, /version. With an API key, /v1/* and /api/* need `Authorization: Bearer KEY`;
/health, /metrics and /version stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import minillm
from minillm.hub.modelfile import Modelfile
from minillm.llm import LLM
from minillm.serve.engine_client import ServingEngine
from minillm.serve.errors import error_response, install_error_handlers
from minillm.serve.ollama_api import ollama_router
from minillm.serve.openai_api import openai_router

PROTECTED_PREFIXES = ("/v1/", "/api/")
OPEN_PATHS = ("/api/version",)


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming responses and disconnects pass through
    untouched. Compares keys in constant time."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path.startswith(PROTECTED_PREFIXES)
            and path not in OPEN_PATHS
            and scope.get("method") != "OPTIONS"
        ):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                why = "missing" if not given else "wrong"
                response = error_response(
                    path,
                    401,
                    f"unauthorized: {why} API key (send the header `Authorization: Bearer <key>`)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JSONBodyMiddleware:
    """Treat every POST body as JSON, whatever its Content-Type says.

    `curl -d '{...}'` (how Ollama's docs call the API) sends application/x-www-form-urlencoded,
    and FastAPI only parses JSON bodies labelled as such; Ollama and vLLM read the JSON anyway.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def build_app(
    llm: LLM,
    *,
    api_key: str | None = None,
    served_model_name: str | Sequence[str] | None = None,
    profile: Modelfile | None = None,
    max_queued_requests: int = 512,
) -> FastAPI:
    """A FastAPI app serving `llm`. The engine thread starts and stops with the app's lifespan
    (so a TestClient used without `with` sees a 503 "not running")."""
    if served_model_name is None:
        served_model_name = llm.loaded.name
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    serving = ServingEngine(llm, names, profile, max_queued_requests)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        serving.start()
        try:
            yield
        finally:
            serving.shutdown()

    app = FastAPI(title="minillm", version=minillm.__version__, lifespan=lifespan)
    app.state.serving = serving
    install_error_handlers(app)
    app.include_router(openai_router(serving))
    app.include_router(ollama_router(serving))

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

    app.add_middleware(JSONBodyMiddleware)
    if api_key:  # added last, so it runs first
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
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
