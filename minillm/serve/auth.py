"""`--api-key`: every path needs `Authorization: Bearer KEY`, except the liveness probes.

Open without a key: `/`, `/health`, `/version`, `/api/version` (what load balancers, Ollama
clients and `minillm bench` probe). Everything else is closed, the generated API docs
(`/docs`, `/redoc`, `/openapi.json`) and `/metrics` included: they describe the deployment
and its traffic. A Prometheus scraper sends the key with `authorization.credentials`.
"""

from __future__ import annotations

import hmac
from typing import Any

from minillm.serve.errors import error_response

OPEN_PATHS = frozenset({"/", "/health", "/version", "/api/version"})


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming responses and disconnects pass through
    untouched. Compares keys in constant time. CORS preflights (OPTIONS) carry no credentials
    by design, so they pass; the request they announce still needs the key."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
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
