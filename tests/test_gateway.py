"""`minillm gateway` in front of real upstreams: `minillm serve` processes on a tiny model.

Faults are injected for real: an upstream killed with SIGKILL while 32 streams run, and small
fake upstreams (FastAPI on a thread; they are not what is tested) that answer 5xx, never
answer, or flap their health check. The client is the `openai` SDK. Every wait is a poll with
a generous deadline; nothing here waits on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from minillm.gateway import from_dict, run_in_thread
from minillm.gateway.cli import register  # noqa: F401 - the CLI module imports cleanly
from minillm.serve.app import start_in_thread
from minillm.testing import HTTPProcess, make_tiny_model

DEADLINE_S = 180.0


# ---------------------------------------------------------------------------- helpers
def wait_for(check: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Poll `check` until it holds; fail naming `what` after a generous deadline."""
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample's values whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(url: str, headers: dict | None = None) -> str:
    return httpx.get(url + "/metrics", headers=headers or {}).text


def serve_tiny(model_dir: Path, port: int, log: Path, name: str = "tiny") -> HTTPProcess:
    """`minillm serve` on the tiny model, as a user starts it; its log goes to a file."""
    args = ["--backend", "ref", "--served-model-name", name, "--max-model-len", "256",
            "--block-size", "8", "--kv-cache-memory", "4MiB", "--max-num-seqs", "8",
            "--threads", "1", "--log-level", "warning"]  # fmt: skip
    return HTTPProcess.minillm("serve", str(model_dir), *args, port=port, log=log)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=23)


@pytest.fixture(scope="module")
def start_serve(tiny_dir, free_port, tmp_path_factory):
    """A factory of `minillm serve` processes; all are stopped, and checked gone, at the end."""
    started: list[HTTPProcess] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(n: int = 1) -> list[HTTPProcess]:
        new = [serve_tiny(tiny_dir, free_port(), logs / f"serve{len(started) + i}.log")
               for i in range(n)]  # fmt: skip
        started.extend(new)
        for s in new:
            wait_for(s.healthy, f"minillm serve at {s.url}")
        return new

    yield start
    for s in started:
        s.stop()
    pids = [s.proc.pid for s in started]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.fixture(scope="module")
def pair(start_serve) -> list[HTTPProcess]:
    """Two long-lived upstreams, A and B, serving "tiny"."""
    return start_serve(2)


@pytest.fixture
def gateway(free_port):
    """`with gateway({...config...}) as gw:` a gateway on a thread, stopped at the end."""
    return lambda config: run_in_thread(from_dict(config), port=free_port())


class Fake:
    """A fake OpenAI-compatible upstream whose behaviour the test sets: `answer` is "ok",
    "500" or "hang"; `health` is "up", "down" or "flap" (200, 500, 200, ...)."""

    def __init__(self, served: list[str]) -> None:
        self.answer, self.health = "ok", "up"
        self.hits = self.health_calls = 0
        self.release = threading.Event()  # ends every hanging request
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in served]}

        @app.get("/health")
        async def health() -> Response:
            self.health_calls += 1
            ok = self.health == "up" or (self.health == "flap" and self.health_calls % 2)
            return JSONResponse({}, status_code=200 if ok else 500)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.hits += 1
            if self.answer == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if self.answer == "hang":
                while not self.release.is_set():
                    await asyncio.sleep(0.05)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            base = {"id": "fake", "model": body["model"], "created": 0}
            if not body.get("stream"):
                msg = {"role": "assistant", "content": "fake answer"}
                choice = {"index": 0, "message": msg, "finish_reason": "stop"}
                return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                                     "usage": usage})  # fmt: skip

            async def events():
                for text, reason in (("fake ", None), ("answer", "stop")):
                    choice = {"index": 0, "delta": {"content": text}, "finish_reason": reason}
                    chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        self.app = app


@pytest.fixture
def fake(free_port) -> Iterator[Callable[[list[str]], tuple[Fake, str]]]:
    servers = []

    def make(models: list[str]) -> tuple[Fake, str]:
        f = Fake(models)
        srv = start_in_thread(f.app, port=free_port())
        servers.append((f, srv))
        return f, srv.url

    yield make
    for f, srv in servers:
        f.release.set()
        srv.stop()


def chat(client: openai.OpenAI, system: str, user: str, **kw):
    return client.chat.completions.with_raw_response.create(
        model=kw.pop("model", "tiny"),
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0,
        max_tokens=kw.pop("max_tokens", 4),
        **kw,
    )


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


# ---------------------------------------------------------------------------- pass-through
def test_answers_match_the_upstream_direct_streamed_or_not(pair, gateway):
    """Through the gateway a client gets what the upstream gives it directly: the same greedy
    text, streamed or not; the same embeddings; /v1/models is the union plus aliases."""
    a, b = pair
    config = {"upstreams": [a.url, b.url], "aliases": {"gpt-4o-mini": "tiny"}}
    with gateway(config) as gw:
        via, direct = sdk(gw.url), sdk(a.url)
        models = {m.id for m in via.models.list().data}
        assert models == {"tiny", "gpt-4o-mini"}
        messages = [{"role": "user", "content": "The quick brown fox"}]
        want = direct.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=8
        )
        got = via.chat.completions.create(
            model="gpt-4o-mini", messages=messages, temperature=0, max_tokens=8
        )
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.total_tokens == want.usage.total_tokens
        stream = via.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=8, stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.choices[0].message.content
        # the gateway asked for usage itself; a client that did not gets no usage-only chunk
        assert all(c.choices for c in chunks)
        stream = via.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        assert [c.usage.total_tokens for c in stream if c.usage] == [want.usage.total_tokens]
        e_via = via.embeddings.create(model="tiny", input=["paged attention"]).data[0].embedding
        e_dir = direct.embeddings.create(model="tiny", input=["paged attention"]).data[0].embedding
        assert e_via == e_dir
        with pytest.raises(openai.NotFoundError, match="'nope' is not served here"):
            via.chat.completions.create(model="nope", messages=messages)
        r = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        health = httpx.get(gw.url + "/health").json()
        assert health["status"] == "ok" and len(health["upstreams"]) == 2


# ---------------------------------------------------------------------------- balancing
def test_prefix_affinity_keeps_a_system_prompt_on_one_upstream(pair, gateway):
    """Requests sharing a system prompt land on one upstream with prefix-affinity (and on both
    with round robin), and the upstreams' own prefix caches show more hits for it."""
    a, b = pair
    users = ["What is a KV cache?", "Explain batching.", "Why quantize?", "Name a kernel."]

    def run(strategy: str, tag: str) -> tuple[dict[str, set[str]], float]:
        hits0 = sum(metric(scrape(u.url), "vllm:prefix_cache_hits_total") for u in pair)
        placed: dict[str, set[str]] = {}
        with gateway({"upstreams": [a.url, b.url], "strategy": strategy}) as gw:
            client = sdk(gw.url)
            for i in range(3):
                system = f"{tag} system prompt number {i}: you are a careful assistant. " * 2
                for user in users:
                    raw = chat(client, system, user)
                    placed.setdefault(system, set()).add(raw.headers["x-minillm-upstream"])
        hits = sum(metric(scrape(u.url), "vllm:prefix_cache_hits_total") for u in pair)
        return placed, hits - hits0

    affinity, affinity_hits = run("prefix-affinity", "alpha")
    rr, rr_hits = run("round-robin", "beta")
    assert all(len(ups) == 1 for ups in affinity.values()), affinity
    assert all(len(ups) == 2 for ups in rr.values()), rr
    assert affinity_hits > rr_hits > 0


# ---------------------------------------------------------------------------- faults
def test_killed_upstream_loses_no_request_under_32_streams(pair, start_serve, gateway):
    """32 concurrent streams over B and C; C is SIGKILLed as soon as it streams. Every request
    completes or ends with a clear error, and only requests already streaming from C may
    end in error: the rest are retried on B."""
    b = pair[1]
    (c,) = start_serve(1)
    config = {"upstreams": [b.url, c.url], "retries": 2, "health": {"interval": 0.5}}
    with gateway(config) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        c_name = c.url.split("//")[1]
        c_streaming = asyncio.Event()

        async def one(i: int) -> tuple[str, str, str]:
            """(outcome, upstream, detail): the gateway sends the status line only once the
            upstream's first event is in hand, so the header names where it started."""
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"request {i}: tell me"}],
                temperature=0, max_tokens=40, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            upstream = stream.response.headers["x-minillm-upstream"]
            reason = None
            try:
                async for chunk in stream:
                    if upstream == c_name:
                        c_streaming.set()
                    for choice in chunk.choices:
                        reason = choice.finish_reason or reason
            except openai.APIError as e:
                return "error", upstream, str(e)
            return ("done" if reason == "length" else "lost"), upstream, str(reason)

        async def main() -> list[tuple[str, str, str]]:
            tasks = [asyncio.create_task(one(i)) for i in range(32)]
            await asyncio.wait_for(c_streaming.wait(), DEADLINE_S)
            os.kill(c.proc.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)

        results = asyncio.run(main())
        c.proc.wait(30)
        errors = [r for r in results if r[0] == "error"]
        assert not [r for r in results if r[0] not in ("done", "error")]
        assert all("closed the stream midway" in r[2] for r in errors), errors
        assert all(r[1] == c_name for r in errors), errors  # only streams already under way
        assert all(r[0] == "done" for r in results if r[1] != c_name)
        text = scrape(gw.url)
        assert metric(text, "minillm_gateway_upstream_errors_total", upstream=c_name) >= 1
        assert metric(text, "minillm_gateway_retries_total") >= 1  # queued on C, served by B
        # the health checks take C out; the gateway keeps answering from B
        wait_for(lambda: not httpx.get(gw.url + "/health").json()["upstreams"][c_name]
                 ["available"], "C to be marked unavailable")  # fmt: skip
        assert chat(sdk(gw.url), "s", "after the kill").headers["x-minillm-upstream"] != c_name


def test_5xx_upstream_is_retried_ejected_and_a_fallback_answers(pair, gateway, fake):
    """An upstream answering 500 costs no request: each one is retried on a healthy upstream,
    the bad one is ejected after `eject_after` failures; a model served only by it falls back."""
    a = pair[0]
    bad, bad_url = fake(["tiny", "flaky"])
    bad.answer = "500"
    config = {
        "upstreams": [{"url": bad_url, "name": "bad"}, {"url": a.url, "name": "a"}],
        "fallbacks": {"flaky": ["tiny"]},
        "health": {"interval": 60, "eject_after": 2, "eject_seconds": 600},
    }
    with gateway(config) as gw:
        client = sdk(gw.url)
        for i in range(6):
            raw = chat(client, "s", f"question {i}")
            assert raw.headers["x-minillm-upstream"] == "a"
            assert raw.parse().choices[0].message.content is not None
        assert bad.hits == 2  # then ejected: no request is sent to it any more
        raw = chat(client, "s", "falls back", model="flaky")
        assert raw.headers["x-minillm-upstream"] == "a" and raw.parse().model == "tiny"
        text = scrape(gw.url)
        assert metric(text, "minillm_gateway_upstream_ejections_total", upstream="bad") == 1
        assert metric(text, "minillm_gateway_upstream_errors_total", upstream="bad") == 2
        assert metric(text, "minillm_gateway_fallbacks_total", model="tiny") == 1
        assert metric(text, "minillm_gateway_upstream_requests_total", upstream="a") == 7
        bad_only = {"upstreams": [bad_url], "health": {"interval": 60}}
    with gateway(bad_only) as gw:  # nowhere to retry: the client sees why
        with pytest.raises(openai.InternalServerError, match="no upstream could answer"):
            chat(sdk(gw.url), "s", "q")


def test_slow_upstream_times_out_and_the_request_is_retried(pair, gateway, fake):
    a = pair[0]
    slow, slow_url = fake(["tiny"])
    slow.answer = "hang"
    config = {
        "upstreams": [{"url": slow_url, "name": "slow"}, {"url": a.url, "name": "a"}],
        "first_byte_timeout": 5,
        "health": {"interval": 60, "eject_after": 1, "eject_seconds": 600},
    }
    with gateway(config) as gw:
        client = sdk(gw.url)
        for i in range(3):
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3,
                stream=True,
            )  # fmt: skip
            assert stream.response.headers["x-minillm-upstream"] == "a"
            assert any(c.choices and c.choices[0].finish_reason for c in stream)
        assert slow.hits == 1
        text = scrape(gw.url)
        assert metric(text, "minillm_gateway_retries_total", reason="timeout") == 1


def test_flapping_health_check_neither_flips_nor_loses_requests(pair, gateway, fake):
    """A health check that alternates ok/fail keeps the upstream's state (it needs 2 in a row
    to change); one that fails steadily takes it out; recovery brings it back."""
    a = pair[0]
    flappy, flappy_url = fake(["tiny"])
    flappy.health = "flap"
    config = {
        "upstreams": [{"url": flappy_url, "name": "flappy"}, {"url": a.url, "name": "a"}],
        "health": {"interval": 0.05, "unhealthy_after": 2, "healthy_after": 2},
    }

    def available() -> bool:
        return httpx.get(gw.url + "/health").json()["upstreams"]["flappy"]["available"]

    with gateway(config) as gw:
        client = sdk(gw.url)
        seen = set()
        start = flappy.health_calls
        while flappy.health_calls < start + 20:
            assert available()
            seen.add(chat(client, "s", "q").headers["x-minillm-upstream"])
        assert seen == {"flappy", "a"}
        text = scrape(gw.url)
        assert metric(text, "minillm_gateway_upstream_ejections_total", upstream="flappy") == 0
        flappy.health = "down"
        wait_for(lambda: not available(), "the failing upstream to be taken out")
        hits = flappy.hits
        assert {chat(client, "s", f"q{i}").headers["x-minillm-upstream"] for i in range(4)} == {"a"}
        assert flappy.hits == hits
        flappy.health = "up"
        wait_for(available, "the recovered upstream to be re-admitted")


# ---------------------------------------------------------------------------- streams
def test_a_client_that_disconnects_aborts_the_upstream_request(gateway, free_port, tiny_dir):
    """The upstream here is a real minillm server on a thread, its steps slowed so the request
    is certainly still running when the client leaves."""
    from minillm import LLM
    from minillm.serve import build_app
    from minillm.testing import slowed_steps

    llm = LLM(str(tiny_dir), backend="ref", block_size=8, kv_cache_memory="4MiB")
    upstream = start_in_thread(build_app(llm, served_model_name="tiny"), port=free_port())
    try:
        with slowed_steps(llm.engine, 0.02), gateway({"upstreams": [upstream.url]}) as gw:
            stream = sdk(gw.url).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=200,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            for n, _ in enumerate(stream):
                if n == 2:
                    break
            stream.close()

            def aborted() -> bool:
                m = scrape(upstream.url)
                return (metric(m, "vllm:request_success_total", finished_reason="abort") == 1
                        and metric(m, "vllm:num_requests_running") == 0)  # fmt: skip

            wait_for(aborted, "the upstream to abort the abandoned request")
            generated = metric(scrape(upstream.url), "vllm:generation_tokens_total")
            assert generated < 200
            wait_for(lambda: httpx.get(gw.url + "/health").json()["upstreams"][
                upstream.url.split("//")[1]]["in_flight"] == 0, "the gateway to release it")  # fmt: skip
    finally:
        upstream.stop()


# ---------------------------------------------------------------------------- keys and quotas
def test_keys_requests_and_tokens_per_minute(pair, gateway):
    a = pair[0]
    config = {
        "upstreams": [a.url],
        "keys": {
            "sk-few-requests": {"name": "few", "requests_per_minute": 2},
            "sk-few-tokens": {"name": "tokens", "tokens_per_minute": 10},
        },
    }
    with gateway(config) as gw:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            chat(sdk(gw.url, "sk-nope"), "s", "q")
        assert httpx.get(gw.url + "/metrics").status_code == 401
        assert httpx.get(gw.url + "/health").status_code == 200  # the probe stays open
        few = sdk(gw.url, "sk-few-requests")
        for _ in range(2):
            chat(few, "s", "q")
        with pytest.raises(openai.RateLimitError) as err:
            chat(few, "s", "q")
        retry_after = int(err.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 60 and "limit 2" in err.value.message
        tokens = sdk(gw.url, "sk-few-tokens")
        stream = tokens.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "count my tokens"}],
            max_tokens=4, stream=True,
        )  # fmt: skip
        assert all(c.choices for c in stream)  # usage was not asked for, yet it is counted
        direct = sdk(a.url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "count my tokens"}], max_tokens=4
        )
        with pytest.raises(openai.RateLimitError, match="limit 10"):
            chat(tokens, "s", "q")
        text = scrape(gw.url, {"Authorization": "Bearer sk-few-tokens"})
        used = metric(text, "minillm_gateway_key_tokens_total", key="tokens")
        assert used == direct.usage.total_tokens
        assert metric(text, "minillm_gateway_key_rate_limited_total", key="few") == 1
        assert metric(text, "minillm_gateway_key_requests_total", key="few") == 2


# ---------------------------------------------------------------------------- the command line
def test_minillm_gateway_command_line(pair, free_port, tmp_path):
    """`minillm gateway` as a user runs it: --config (YAML) plus flags on top."""
    a, b = pair
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"upstreams:\n  - url: {a.url}/v1\n    name: a\naliases:\n  smol: tiny\n"
        "strategy: least-requests\n"
    )
    port = free_port()
    cmd = [sys.executable, "-m", "minillm.cli", "gateway", "--config", str(cfg), "--upstream",
           b.url, "--api-key", "sk-cli", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "minillm gateway")
        client = sdk(url, "sk-cli")
        assert {m.id for m in client.models.list().data} == {"tiny", "smol"}
        r = client.completions.create(model="smol", prompt="The quick", max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"gateway at {url}/v1 -> a ({a.url})" in out and "least-requests" in out
    bad = subprocess.run(
        [sys.executable, "-m", "minillm.cli", "gateway", "--upstream", "localhost:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "must look like http://host:port" in bad.stderr
