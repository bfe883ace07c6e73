"""Forwarding one request: pick an upstream, retry or fall back on failure, relay the answer.

A request is *committed* once its first byte went to the client. Before that every failure is
retried on another upstream serving the model (a refused connection, a timeout, a 5xx, a
connection dropped before the first SSE event), then on the model's fallbacks; so a killed
upstream costs no request that had not started streaming. After it, the status line is gone
and the only honest move left is an SSE error event, then [DONE]: a stream cut midway ends
with {"error": {"code": 502, "message": "upstream ... closed the stream midway ..."}}.

Streams are relayed event by event as they arrive (no buffering beyond the one event being
received). The gateway asks streaming upstreams for `usage` (stream_options.include_usage),
to charge the key's tokens, and drops that usage-only chunk when the client did not ask for
it. A client that disconnects closes the upstream connection, which aborts its request there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from minillm.gateway.balance import Balancer
from minillm.gateway.config import GatewayConfig, KeyPolicy
from minillm.gateway.errors import error_response, openai_error
from minillm.gateway.health import Health
from minillm.gateway.metrics import GatewayMetrics
from minillm.gateway.quotas import Quotas
from minillm.gateway.upstreams import Upstream, UpstreamPool

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
UPSTREAM_HEADER = "x-minillm-upstream"  # which upstream answered: for logs, tests, the arena


def prompt_key(body: dict[str, Any], chars: int) -> str:
    """The prefix-affinity key: what the model reads first, at most `chars` characters.

    Chat: the system message when the conversation starts with one (requests that share a
    system prompt share its KV blocks, whatever the user asks), else the first message (a
    conversation keeps its upstream turn after turn). Completions and embeddings: the
    prompt's (the first prompt's) leading text."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return f"{first.get('role', '')}:{content or ''}"[:chars]
    prompt = body.get("prompt", body.get("input", ""))
    while isinstance(prompt, list) and prompt:  # a batch: the first prompt decides
        prompt = prompt[0]
    return str(prompt)[:chars]


@dataclass
class Failure:
    """An attempt that can be retried elsewhere: nothing has reached the client yet."""

    status: int
    kind: str  # connect, timeout, status_5xx, stream_cut
    message: str


def usage_tokens(data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a body or chunk with `usage`, else None."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return prompt, completion


class Relay:
    """One committed SSE stream from an upstream to the client, event by event."""

    def __init__(
        self,
        up: Upstream,
        response: httpx.Response,
        chunks: AsyncIterator[bytes],
        pending: bytes,
        want_usage: bool,
        on_end: Callable[[Relay], None],
    ) -> None:
        self.up, self.response, self.chunks, self.pending = up, response, chunks, pending
        self.want_usage, self.on_end = want_usage, on_end
        self.usage: tuple[int, int] | None = None
        self.saw_done = False
        self.cut: str | None = None  # why the upstream stream ended early
        self.closed = False

    def _filter(self, events: bytes) -> bytes:
        """Complete events as they go out: note usage and [DONE]; drop usage the client did
        not ask for. Only events that mention usage are parsed."""
        if b'"usage"' not in events and DONE not in events:
            return events
        out = []
        for ev in events.split(b"\n\n"):
            if not ev:
                continue
            if ev.strip() == DONE.strip():
                self.saw_done = True
            elif b'"usage"' in ev and ev.startswith(b"data:"):
                try:
                    data = json.loads(ev[5:])
                except ValueError:
                    data = None
                tokens = usage_tokens(data)
                if tokens is not None:
                    self.usage = tokens
                    if not self.want_usage and not data.get("choices"):
                        continue  # the usage-only chunk the gateway asked for itself
            out.append(ev + b"\n\n")
        return b"".join(out)

    def take_events(self) -> bytes:
        """Everything up to the last complete event; the rest waits for its end."""
        end = self.pending.rfind(b"\n\n")
        if end < 0:
            return b""
        events, self.pending = self.pending[: end + 2], self.pending[end + 2 :]
        return self._filter(events)

    async def events(self) -> AsyncIterator[bytes]:
        first = self.take_events()
        if first:
            yield first
        try:
            async for chunk in self.chunks:
                self.pending += chunk
                out = self.take_events()
                if out:
                    yield out
            if not self.saw_done:
                self.cut = "the upstream ended the stream without [DONE]"
        except httpx.HTTPError as e:
            self.cut = f"{type(e).__name__}: {e}"
        if self.cut:
            message = (
                f"upstream {self.up.name} closed the stream midway ({self.cut}); "
                "the answer above is incomplete"
            )
            yield f"data: {json.dumps(openai_error(502, message))}\n\n".encode() + DONE

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.response.aclose()  # unread: the connection closes, the upstream aborts
        self.on_end(self)


class RelayResponse(StreamingResponse):
    """Closes the relay however the response ends (done, error, client gone)."""

    def __init__(self, relay: Relay) -> None:
        headers = {**SSE_HEADERS, UPSTREAM_HEADER: relay.up.name}
        super().__init__(relay.events(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.close()


class Proxy:
    def __init__(
        self,
        config: GatewayConfig,
        pool: UpstreamPool,
        balancer: Balancer,
        health: Health,
        metrics: GatewayMetrics,
        quotas: Quotas,
    ) -> None:
        self.config, self.pool, self.balancer = config, pool, balancer
        self.health, self.metrics, self.quotas = health, metrics, quotas
        self.client: httpx.AsyncClient | None = None  # set by the app's lifespan

    # ------------------------------------------------------------------ entry
    async def handle(self, request: Request, path: str, key: KeyPolicy | None) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return error_response(400, f"the request body is not valid JSON ({e})")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            known = ", ".join(self.pool.models()) or "none yet"
            return error_response(400, f"model is required (served: {known})", "model")
        chain = self.config.chain(model)
        if not any(self.pool.serving(m) for m in chain):
            known = ", ".join(self.pool.models() + list(self.config.aliases)) or "none yet"
            return error_response(404, f"model {model!r} is not served here (served: {known})")
        if key is not None:
            refusal = self.quotas.admit(key)
            if refusal is not None:
                self.metrics.rate_limited.labels(key.name, refusal.limit).inc()
                return error_response(
                    429, refusal.message, headers={"Retry-After": str(refusal.retry_after)}
                )
            self.metrics.key_requests.labels(key.name).inc()
        return await self.route(body, path, chain, request.headers.get("authorization"), key)

    async def route(
        self,
        body: dict[str, Any],
        path: str,
        chain: list[str],
        auth: str | None,
        key: KeyPolicy | None,
    ) -> Response:
        """Try the model's upstreams, then each fallback's, until one answers."""
        prefix = prompt_key(body, self.config.prefix_chars)
        failures: list[str] = []
        last: Failure | None = None
        for i, model in enumerate(chain):
            tried: set[str] = set()
            for _ in range(self.config.retries + 1):
                candidates = [
                    u for u in self.pool.serving(model) if u.available() and u.name not in tried
                ]
                if not candidates:
                    break
                up = self.balancer.choose(candidates, prefix)
                tried.add(up.name)
                outcome = await self.attempt(up, model, body, path, auth, key)
                if not isinstance(outcome, Failure):
                    if i > 0:
                        self.metrics.fallbacks.labels(model).inc()
                    return outcome
                last = outcome
                failures.append(f"{up.name}: {outcome.message}")
                self.metrics.retries.labels(outcome.kind).inc()
            if not tried:
                failures.append(f"{model}: no available upstream ({self.why_out(model)})")
        status = last.status if last is not None else 503
        return error_response(
            status, f"no upstream could answer for model {chain[0]!r}: " + "; ".join(failures)
        )

    def why_out(self, model: str) -> str:
        out = []
        for u in self.pool.serving(model):
            state = "ejected" if u.healthy else "failing health checks"
            out.append(
                f"{u.name} {state}" + (f", last error {u.last_error}" if u.last_error else "")
            )
        return "; ".join(out) or "none serves it"

    # ------------------------------------------------------------------ one attempt
    async def attempt(
        self,
        up: Upstream,
        model: str,
        body: dict[str, Any],
        path: str,
        auth: str | None,
        key: KeyPolicy | None,
    ) -> Response | Failure:
        assert self.client is not None, "the gateway app is not running (lifespan)"
        payload = {**body, "model": model}
        stream = bool(body.get("stream"))
        want_usage = False
        if stream:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            want_usage = bool(options.get("include_usage"))
            payload["stream_options"] = {**options, "include_usage": True}
        t0 = time.perf_counter()
        up.in_flight += 1
        self.metrics.in_flight.labels(up.name).inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                up.in_flight -= 1
                self.metrics.in_flight.labels(up.name).dec()
                self.metrics.latency.labels(up.name, "total").observe(time.perf_counter() - t0)

        request = self.client.build_request(
            "POST", up.spec.url + path, json=payload, headers=up.headers(auth)
        )
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(self.config.first_byte_timeout):
                response = await self.client.send(request, stream=True)
                self.metrics.requests.labels(up.name, str(response.status_code)).inc()
                if response.status_code >= 400 or not stream or not is_sse(response):
                    content = await response.aread()
                    await response.aclose()
                    return self.finish_plain(up, response, content, key, release)
                chunks = response.aiter_raw()
                pending = b""
                while b"\n\n" not in pending:  # the first whole event commits the request
                    pending += await anext(chunks)
        except (httpx.HTTPError, TimeoutError, StopAsyncIteration) as e:
            if response is not None:
                await response.aclose()
            release()
            return self.failed(up, e)
        except BaseException:  # cancelled (client gone): no request left behind upstream
            if response is not None:
                await response.aclose()
            release()
            raise
        self.metrics.latency.labels(up.name, "first_byte").observe(time.perf_counter() - t0)

        def on_end(relay: Relay) -> None:
            release()
            if relay.cut:
                self.health.request_failed(up, f"stream_cut: {relay.cut}")
            else:
                self.health.request_succeeded(up)
            self.charge(key, relay.usage)

        relay = Relay(up, response, chunks, pending, want_usage, on_end)
        return RelayResponse(relay)

    def failed(self, up: Upstream, e: BaseException) -> Failure:
        if isinstance(e, TimeoutError | httpx.TimeoutException) and not isinstance(
            e, httpx.ConnectTimeout
        ):
            kind, status = "timeout", 504
            message = f"no answer within {self.config.first_byte_timeout:g} s"
        elif isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            kind, status, message = "connect", 502, f"cannot connect ({e})"
        else:
            kind, status = "stream_cut", 502
            message = f"closed the connection before answering ({type(e).__name__})"
        self.health.request_failed(up, f"{kind}: {message}")
        return Failure(status, kind, message)

    def finish_plain(
        self,
        up: Upstream,
        response: httpx.Response,
        content: bytes,
        key: KeyPolicy | None,
        release: Callable[[], None],
    ) -> Response | Failure:
        """A whole (non-SSE) answer: a 5xx is retried elsewhere, anything else goes back."""
        release()
        status = response.status_code
        if status >= 500:
            detail = content[:300].decode(errors="replace")
            self.health.request_failed(up, f"status_5xx: HTTP {status}")
            return Failure(status, "status_5xx", f"HTTP {status} {detail}")
        self.health.request_succeeded(up)
        if status < 300:
            try:
                self.charge(key, usage_tokens(json.loads(content)))
            except ValueError:
                pass
        media = response.headers.get("content-type", "application/json")
        return Response(
            content, status_code=status, media_type=media, headers={UPSTREAM_HEADER: up.name}
        )

    def charge(self, key: KeyPolicy | None, usage: tuple[int, int] | None) -> None:
        if key is None or usage is None:
            return
        prompt, completion = usage
        self.metrics.key_tokens.labels(key.name, "prompt").inc(prompt)
        self.metrics.key_tokens.labels(key.name, "completion").inc(completion)
        self.quotas.charge(key, prompt + completion)


def is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
