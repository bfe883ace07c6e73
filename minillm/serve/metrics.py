"""/metrics: the engine's state and every request's timings, in Prometheus' text format.

The names are vLLM's, so dashboards and alerts written for vLLM read minillm unchanged:

- state at scrape time (read from the engine, nothing to keep in sync):
  vllm:num_requests_running, vllm:num_requests_waiting (gauges), vllm:kv_cache_usage_perc
  (0..1), and the counters vllm:prompt_tokens_total, vllm:generation_tokens_total,
  vllm:request_success_total{finished_reason}, vllm:prefix_cache_queries_total,
  vllm:prefix_cache_hits_total (in tokens), vllm:num_preemptions_total;
- per-request histograms, observed when a request finishes (the engine's own timestamps):
  vllm:time_to_first_token_seconds, vllm:e2e_request_latency_seconds,
  vllm:request_queue_time_seconds, vllm:request_prompt_tokens, vllm:request_generation_tokens;
  and vllm:inter_token_latency_seconds, observed by the server as tokens arrive;
- prefill/decode disaggregation (serve/pd_prefill.py, serve/pd_decode.py), on both servers of a
  pair (zero elsewhere): minillm:kv_transfer_bytes_total (K/V bytes sent by a prefill server,
  received by a decode server) and the histogram minillm:kv_transfer_seconds (one request's
  K/V on the wire: first frame to last).

Each app gets its own CollectorRegistry, so several servers (or tests) in one process do not
share counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from minillm.engine.llm_engine import LLMEngine
from minillm.engine.outputs import RequestOutput

# Bucket edges (seconds) cover a fast GPU (ms) and a slow shared CPU (tens of seconds).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
TOKEN_GAP_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FINISH_REASONS = ("stop", "length", "abort")


class EngineCollector(Collector):
    """Reads the engine's gauges and monotonic counters each time /metrics is scraped."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Any]:
        eng, labels = self.engine, ["model_name"]
        bm = eng.block_manager

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", eng.num_running)
        yield gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", eng.num_waiting
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", bm.usage
        )
        yield counter("vllm:prompt_tokens", "Prompt tokens received.", eng.stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", eng.stats.generation_tokens)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            bm.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            bm.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions",
            "Sequences preempted (recomputed later).",
            eng.scheduler.num_preemptions,
        )
        done = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by reason.",
            labels=["model_name", "finished_reason"],
        )
        finished = dict.fromkeys(FINISH_REASONS, 0) | eng.stats.finished_requests
        for reason, count in sorted(finished.items()):
            done.add_metric([self.model_name, reason], count)
        yield done


class ServerMetrics:
    """The app's registry: the engine collector plus request histograms."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(EngineCollector(engine, model_name))

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(
                name, doc, ["model_name"], buckets=buckets, registry=self.registry
            ).labels(model_name)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Arrival to first generated token (includes queueing).",
            LATENCY_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            TOKEN_GAP_BUCKETS,
        )
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Arrival to first scheduled (time spent waiting).",
            LATENCY_BUCKETS,
        )
        self.prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Prompt length per request.", TOKEN_COUNT_BUCKETS
        )
        self.generation_tokens = hist(
            "vllm:request_generation_tokens", "Generated tokens per request.", TOKEN_COUNT_BUCKETS
        )

        self.kv_transfer_bytes = Counter(
            "minillm:kv_transfer_bytes",
            "K/V bytes moved between a prefill and a decode server (sent or received).",
            ["model_name"],
            registry=self.registry,
        ).labels(model_name)
        self.kv_transfer_seconds = hist(
            "minillm:kv_transfer_seconds",
            "Time one request's K/V took on the wire between prefill and decode servers.",
            LATENCY_BUCKETS,
        )

    def observe_kv_transfer(self, nbytes: int, seconds: float) -> None:
        """One request's K/V transfer (thread-safe: called from transfer threads)."""
        self.kv_transfer_bytes.inc(nbytes)
        self.kv_transfer_seconds.observe(seconds)

    def on_finished(self, out: RequestOutput) -> None:
        """AsyncLLMEngine hook (runs on the engine thread; prometheus_client is thread-safe)."""
        m = out.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.queue_time is not None:
            self.queue.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        self.prompt_tokens.observe(m.num_prompt_tokens)
        self.generation_tokens.observe(m.num_generation_tokens)

    def observe_token_gap(self, seconds: float, tokens: int = 1) -> None:
        """`tokens` arrived together `seconds` after the previous ones: one gap per token."""
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
