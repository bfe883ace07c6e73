"""`minillm bench`: a client-side load generator for any OpenAI-compatible server.

N concurrent clients (a closed loop: each sends its next request when the previous one ends)
stream `num_requests` completions and time every chunk as it arrives:

- TTFT (time to first token): request sent -> first chunk with text. What a user waits for.
- ITL (inter-token latency): gaps between text chunks of one stream.
- TPOT (time per output token): (latency - TTFT) / (output tokens - 1), per request: the
  decode speed a user sees once text flows.
- E2E latency: request sent -> last byte.
- throughput: completed requests / s and output tokens / s over the whole run (wall clock),
  the server-side view: what the batch as a whole delivers.

Percentiles are P50/P90/P99 over requests (linear interpolation, like numpy's default). Token
counts come from the server's `usage` (stream_options.include_usage), or, for a server that does
not send it, from the number of text chunks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# A neutral vocabulary for synthetic prompts: about one token per word in most tokenizers.
_WORDS = (
    "the model reads a prompt and writes tokens one at a time while the server batches many "
    "requests together so that every step of the engine serves all clients at once and memory "
    "bandwidth is shared between them cache block page queue token latency throughput"
).split()


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    model: str
    concurrency: int = 1
    num_requests: int = 8
    max_tokens: int = 64
    prompt_len: int = 32
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    api_key: str | None = None
    ignore_eos: bool = False  # vLLM's extra: every answer is exactly max_tokens long
    temperature: float = 0.0
    timeout: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("concurrency", "num_requests", "max_tokens", "prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.endpoint not in ("/v1/completions", "/v1/chat/completions"):
            raise ValueError(
                f"endpoint must be /v1/completions or /v1/chat/completions, got {self.endpoint!r}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


@dataclass
class RequestResult:
    ok: bool
    latency: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": sum(values) / len(values) if values else math.nan,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[RequestResult]
    duration: float

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict[str, Any]:
        done = self.completed
        out_tokens = sum(r.output_tokens for r in done)
        in_tokens = sum(r.prompt_tokens for r in done)
        return {
            "concurrency": self.config.concurrency,
            "completed": len(done),
            "failed": len(self.results) - len(done),
            "duration_s": self.duration,
            "prompt_tokens": in_tokens,
            "output_tokens": out_tokens,
            "request_throughput": len(done) / self.duration,
            "output_throughput": out_tokens / self.duration,
            "total_token_throughput": (in_tokens + out_tokens) / self.duration,
            "ttft_s": _stats([r.ttft for r in done if r.ttft is not None]),
            "tpot_s": _stats([t for r in done if (t := r.tpot) is not None]),
            "itl_s": _stats([g for r in done for g in r.itl]),
            "e2e_s": _stats([r.latency for r in done]),
            "errors": sorted({r.error for r in self.results if r.error})[:5],
        }

    def to_json(self) -> str:
        return json.dumps({"config": asdict(self.config), "summary": self.summary()}, indent=2)


def make_prompt(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def _payload(cfg: BenchConfig, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": cfg.temperature,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return (c.get("delta") or {}).get("content") or c.get("text") or ""


async def one_request(client: httpx.AsyncClient, cfg: BenchConfig, prompt: str) -> RequestResult:
    """Stream one completion and time it (a failure is recorded, never raised)."""
    start = time.perf_counter()
    result = RequestResult(ok=False, latency=0.0)
    last, chunks = None, 0
    try:
        async with client.stream("POST", cfg.endpoint, json=_payload(cfg, prompt)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    chunks += 1
                    if result.ttft is None:
                        result.ttft = now - start
                    elif last is not None:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        result.latency = time.perf_counter() - start
    return result


async def run_bench(cfg: BenchConfig) -> BenchReport:
    """Send cfg.num_requests requests from cfg.concurrency concurrent clients."""
    rng = random.Random(cfg.seed)
    prompts = [make_prompt(cfg.prompt_len, rng) for _ in range(cfg.num_requests)]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(
        max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
    )
    results: list[RequestResult] = []
    async with httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout, limits=limits
    ) as client:
        queue = iter(prompts)

        async def worker() -> None:
            for prompt in queue:  # a shared iterator: each prompt is taken by one worker
                results.append(await one_request(client, cfg, prompt))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.num_requests))))
        duration = time.perf_counter() - start
    return BenchReport(cfg, results, duration)


def bench(cfg: BenchConfig) -> BenchReport:
    """Run the benchmark to completion (from plain code or from a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_bench(cfg))
    # an event loop already runs in this thread (Jupyter): run ours on a worker thread
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run_bench(cfg)).result()


def format_report(report: BenchReport) -> str:
    """The summary as a text table, vLLM benchmark style."""
    s = report.summary()
    ms = 1000.0
    lines = [
        f"{'=' * 18} Serving Benchmark Result {'=' * 18}",
        f"{'Server':<34}{report.config.base_url}{report.config.endpoint}",
        f"{'Concurrency':<34}{s['concurrency']}",
        f"{'Successful requests':<34}{s['completed']}",
        f"{'Failed requests':<34}{s['failed']}",
        f"{'Benchmark duration (s)':<34}{s['duration_s']:.2f}",
        f"{'Total input tokens':<34}{s['prompt_tokens']}",
        f"{'Total generated tokens':<34}{s['output_tokens']}",
        f"{'Request throughput (req/s)':<34}{s['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s)':<34}{s['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s)':<34}{s['total_token_throughput']:.2f}",
        f"{'metric (ms)':<16}{'mean':>10}{'P50':>10}{'P90':>10}{'P99':>10}",
    ]
    for label, key in (
        ("TTFT", "ttft_s"),
        ("TPOT", "tpot_s"),
        ("ITL", "itl_s"),
        ("E2E latency", "e2e_s"),
    ):
        st = s[key]
        lines.append(
            f"{label:<16}" + "".join(f"{st[k] * ms:>10.1f}" for k in ("mean", "p50", "p90", "p99"))
        )
    for err in s["errors"]:
        lines.append(f"error: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)
