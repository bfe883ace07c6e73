"""/metrics of the gateway, in Prometheus' text format (one registry per app).

Per upstream: minillm_gateway_upstream_requests_total{upstream,status},
minillm_gateway_upstream_errors_total{upstream,kind} (connect, timeout, status_5xx, stream_cut),
minillm_gateway_upstream_latency_seconds{upstream,phase} (first_byte, total),
minillm_gateway_upstream_ejections_total{upstream}, minillm_gateway_upstream_in_flight{upstream},
minillm_gateway_upstream_available{upstream}.
Per key (its configured name, never the key): minillm_gateway_key_requests_total{key},
minillm_gateway_key_tokens_total{key,kind} (prompt, completion: the upstreams' `usage`),
minillm_gateway_key_rate_limited_total{key,limit}.
Gateway-wide: minillm_gateway_retries_total{reason}, minillm_gateway_fallbacks_total{model}.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)  # fmt: skip


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "minillm_gateway_"
        self.requests = Counter(
            p + "upstream_requests", "Requests sent upstream, by HTTP status.",
            ["upstream", "status"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            p + "upstream_errors", "Failed upstream attempts, by kind.",
            ["upstream", "kind"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            p + "upstream_latency_seconds", "Upstream time to first byte and to the end.",
            ["upstream", "phase"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ejections = Counter(
            p + "upstream_ejections", "Times an upstream was taken out of rotation.",
            ["upstream"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            p + "upstream_in_flight", "Requests in flight.", ["upstream"], registry=r
        )
        self.healthy = Gauge(
            p + "upstream_available", "1 when the upstream takes requests.", ["upstream"],
            registry=r,
        )  # fmt: skip
        self.key_requests = Counter(
            p + "key_requests", "Requests admitted, per API key.", ["key"], registry=r
        )
        self.key_tokens = Counter(
            p + "key_tokens", "Tokens used per API key (from upstream usage).",
            ["key", "kind"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            p + "key_rate_limited", "Requests refused with 429, per key and limit.",
            ["key", "limit"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            p + "retries", "Requests sent again to another upstream.", ["reason"], registry=r
        )
        self.fallbacks = Counter(
            p + "fallbacks", "Requests served by a fallback model.", ["model"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
