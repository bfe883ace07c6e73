"""The gateway app: one OpenAI-compatible entry point in front of many upstreams.

    config = from_dict({"upstreams": ["http://127.0.0.1:8001", "http://127.0.0.1:8002"],
                        "strategy": "prefix-affinity"})
    app = create_app(config)                  # uvicorn.run(app, port=9000) is `minillm gateway`
    with run_in_thread(config, port=9000) as gw:   # notebooks and tests
        openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings (proxied, see proxy.py),
GET /v1/models (the union of the upstreams' models, plus aliases), /health (200 while some
upstream is available), /metrics (Prometheus). With keys configured every route but /health
needs `Authorization: Bearer KEY`, /metrics included (it shows every key's usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillm.gateway.balance import make_balancer
from minillm.gateway.config import GatewayConfig, KeyPolicy
from minillm.gateway.errors import error_response
from minillm.gateway.health import Health
from minillm.gateway.metrics import GatewayMetrics
from minillm.gateway.proxy import Proxy
from minillm.gateway.quotas import Quotas
from minillm.gateway.upstreams import UpstreamPool


class Unauthorized(Exception):
    pass


def create_app(config: GatewayConfig) -> FastAPI:
    """A FastAPI app; its lifespan opens the upstream connection pool, reads each upstream's
    models and runs the health checks."""
    metrics = GatewayMetrics()
    pool = UpstreamPool(config)
    health = Health(pool, metrics)
    proxy = Proxy(config, pool, make_balancer(config.strategy), health, metrics, Quotas())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(connect=config.connect_timeout, read=None, write=30, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            proxy.client = client
            found = await asyncio.gather(*(pool.discover(client, u) for u in pool.upstreams))
            for up, ok in zip(pool.upstreams, found, strict=True):
                up.healthy = ok  # unreachable now: the health loop brings it in later
                metrics.healthy.labels(up.name).set(1 if ok else 0)
            checks = asyncio.create_task(health.run(client))
            try:
                yield
            finally:
                checks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checks

    app = FastAPI(title="minillm gateway", lifespan=lifespan)
    app.state.pool, app.state.proxy, app.state.metrics = pool, proxy, metrics
    expected = {f"Bearer {k}".encode(): policy for k, policy in config.keys.items()}

    def key_of(request: Request) -> KeyPolicy | None:
        """The caller's key policy; None when the gateway is open."""
        if not expected:
            return None
        given = request.headers.get("authorization", "").encode()
        for want, policy in expected.items():
            if hmac.compare_digest(given, want):
                return policy
        raise Unauthorized("missing" if not given else "wrong")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return error_response(
            401, f"unauthorized: {exc} API key (send the header `Authorization: Bearer <key>`)"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy.handle(request, "/v1/chat/completions", key_of(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.handle(request, "/v1/completions", key_of(request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await proxy.handle(request, "/v1/embeddings", key_of(request))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        key_of(request)
        cards = []
        for m in pool.models():
            ups = [u.name for u in pool.serving(m)]
            cards.append({"id": m, "object": "model", "owned_by": "minillm-gateway",
                          "upstreams": ups})  # fmt: skip
        served = set(pool.models())
        for alias, target in config.aliases.items():
            if target in served and alias not in served:
                cards.append({"id": alias, "object": "model", "owned_by": "minillm-gateway",
                              "root": target})  # fmt: skip
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health_route() -> JSONResponse:
        states = {
            u.name: {
                "available": u.available(),
                "in_flight": u.in_flight,
                "models": sorted(u.models),
                **({"last_error": u.last_error} if u.last_error else {}),
            }
            for u in pool.upstreams
        }
        ok = any(s["available"] for s in states.values())
        body = {"status": "ok" if ok else "unavailable", "upstreams": states}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        key_of(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------------- running it
@dataclass
class GatewayServer:
    """A gateway served by uvicorn on a daemon thread; `url` is its base address."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str
    app: FastAPI

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    config: GatewayConfig, host: str = "127.0.0.1", port: int = 9000, timeout: float = 60
) -> GatewayServer:
    """Start a gateway on a thread and wait until it accepts requests (notebooks, tests)."""
    app = create_app(config)
    uv = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                        access_log=False, timeout_graceful_shutdown=2)  # fmt: skip
    server = uvicorn.Server(uv)
    thread = threading.Thread(target=server.run, name=f"minillm-gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the gateway on {host}:{port} failed to start (see its log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the gateway on {host}:{port} did not start in {timeout} s")
        time.sleep(0.02)
    return GatewayServer(server, thread, f"http://{host}:{port}", app)


@contextlib.contextmanager
def run_in_thread(
    config: GatewayConfig, host: str = "127.0.0.1", port: int = 9000
) -> Iterator[GatewayServer]:
    """`with run_in_thread(config, port=p) as gw:` ... the gateway stops on exit."""
    server = start_in_thread(config, host, port)
    try:
        yield server
    finally:
        server.stop()


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 9000,
          log_level: str = "info") -> None:  # fmt: skip
    """Serve in the foreground until Ctrl+C (what `minillm gateway` runs)."""
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=5)  # fmt: skip
