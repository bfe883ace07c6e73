"""The upstreams' live state: which models each serves, requests in flight, health.

State changes only on the gateway's event loop (requests, health checks), so nothing here
needs a lock. An upstream is *available* when its active checks pass and it is not ejected
(too many failed requests in a row; see health.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from minillm.gateway.config import GatewayConfig, UpstreamSpec


@dataclass
class Upstream:
    spec: UpstreamSpec
    models: set[str] = field(default_factory=set)
    in_flight: int = 0
    healthy: bool = True  # last verdict of the active checks (optimistic until the first)
    ejected_until: float = 0.0  # monotonic time; passive ejection
    failures: int = 0  # consecutive failed requests (passive)
    check_failures: int = 0  # consecutive failed active checks
    check_successes: int = 0
    last_error: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.healthy and now >= self.ejected_until

    def headers(self, client_auth: str | None) -> dict[str, str]:
        """Authorization for this upstream: its own key, else what the client sent (None:
        the gateway checks keys itself, and its keys are not the upstream's business)."""
        if self.spec.api_key:
            return {"authorization": f"Bearer {self.spec.api_key}"}
        return {"authorization": client_auth} if client_auth else {}


class UpstreamPool:
    """All upstreams, and which may serve a model (discovered models, narrowed by routes)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.upstreams = [Upstream(spec) for spec in config.upstreams]
        for up in self.upstreams:
            if up.spec.models is not None:
                up.models = set(up.spec.models)
        self.by_name = {u.name: u for u in self.upstreams}

    def serving(self, model: str) -> list[Upstream]:
        """Upstreams that serve `model` and that its route allows, available or not."""
        allowed = self.config.routes.get(model)
        return [
            u
            for u in self.upstreams
            if model in u.models and (allowed is None or u.name in allowed)
        ]

    def models(self) -> list[str]:
        """The union of every upstream's models, in first-seen order."""
        seen: dict[str, None] = {}
        for u in self.upstreams:
            for m in sorted(u.models):
                seen.setdefault(m, None)
        return list(seen)

    async def discover(self, client: httpx.AsyncClient, up: Upstream) -> bool:
        """Ask `up` for its models (GET /v1/models); False when it cannot say."""
        if up.spec.models is not None:
            return True
        try:
            r = await client.get(
                up.spec.url + "/v1/models",
                headers=up.headers(None),
                timeout=self.config.health.timeout,
            )
            r.raise_for_status()
            up.models = {str(m["id"]) for m in r.json()["data"]}
            return True
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            up.last_error = f"model discovery failed: {e!r}"
            return False
