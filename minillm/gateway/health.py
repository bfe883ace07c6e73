"""Health: active checks on a timer, passive ejection after failed requests, re-admission.

Active: every `interval` s each upstream's health path is fetched; `unhealthy_after` failures
in a row take it out, `healthy_after` successes in a row bring it back (and re-read its models).
Passive: `eject_after` failed requests in a row (connection refused, a 5xx, a stream cut)
eject it for `eject_seconds`, as Envoy's outlier detection does. When that time is up it takes
requests again; its failure count resets only on a success (a request or a probe), so one more
failure ejects it again at once. Either way a failed attempt is retried elsewhere, so a dead
upstream costs attempts, never a client's request that had not started.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from minillm.gateway.config import HealthPolicy
from minillm.gateway.metrics import GatewayMetrics
from minillm.gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("minillm.gateway")


class Health:
    def __init__(self, pool: UpstreamPool, metrics: GatewayMetrics) -> None:
        self.pool, self.metrics = pool, metrics
        self.policy: HealthPolicy = pool.config.health

    # ------------------------------------------------------------------ passive
    def request_failed(self, up: Upstream, why: str) -> None:
        up.failures += 1
        up.last_error = why
        self.metrics.errors.labels(up.name, why.split(":", 1)[0]).inc()
        if up.failures >= self.policy.eject_after and up.available():
            up.ejected_until = time.monotonic() + self.policy.eject_seconds
            self.metrics.ejections.labels(up.name).inc()
            log.warning("ejected %s for %.0f s after %d failures (%s)", up.name,
                        self.policy.eject_seconds, up.failures, why)  # fmt: skip

    def request_succeeded(self, up: Upstream) -> None:
        up.failures = 0

    # ------------------------------------------------------------------ active
    async def probe(self, client: httpx.AsyncClient, up: Upstream) -> bool:
        try:
            r = await client.get(
                up.spec.url + up.spec.health_path,
                headers=up.headers(None),
                timeout=self.policy.timeout,
            )
            return r.status_code < 400
        except httpx.HTTPError as e:
            up.last_error = f"health check: {e!r}"
            return False

    async def check(self, client: httpx.AsyncClient, up: Upstream) -> None:
        """One active check of `up`, and what its result changes."""
        ok = await self.probe(client, up)
        if ok:
            up.check_successes, up.check_failures = up.check_successes + 1, 0
            comes_back = not up.healthy and up.check_successes >= self.policy.healthy_after
            if (comes_back or not up.models) and await self.pool.discover(client, up):
                up.healthy = True
            if time.monotonic() >= up.ejected_until > 0:  # ejection served: back in
                up.ejected_until, up.failures = 0.0, 0
        else:
            up.check_failures, up.check_successes = up.check_failures + 1, 0
            if up.healthy and up.check_failures >= self.policy.unhealthy_after:
                up.healthy = False
                self.metrics.ejections.labels(up.name).inc()
                log.warning("%s failed %d health checks: out", up.name, up.check_failures)
        self.metrics.healthy.labels(up.name).set(1 if up.available() else 0)

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, u) for u in self.pool.upstreams))

    async def run(self, client: httpx.AsyncClient) -> None:
        """The loop the app runs for its lifetime."""
        while True:
            await asyncio.sleep(self.policy.interval)
            try:
                await self.check_all(client)
            except Exception:  # noqa: BLE001 - a bug in one round must not end the loop
                log.exception("health check round failed")
