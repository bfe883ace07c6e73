"""Prefill/decode disaggregation: a `minillm serve --disaggregation-mode prefill` server and a
`--disaggregation-mode decode --prefill-url` server, as real processes, against one colocated
server.

What is checked: the pair's answers equal the colocated server's (the `openai` SDK, streamed and
not, greedy and seeded sampling, on a tiny random model and on the bundled SmolLM2); the K/V
bytes each request moves equal 2 x layers x prompt tokens x KV heads x head dim x 4 (float32)
on both servers' /metrics; a prompt sharing a prefix hits the prefill server's prefix cache;
a prefill server that is down, is not a prefill server, serves another model, or cuts the
stream gives the client a clear 5xx and leaves no KV block held on the decode server; the
internal endpoint is closed to ordinary clients; no process outlives the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from minillm import LLM
from minillm.parallel.pd_transfer import KVLayout
from minillm.serve import build_app
from minillm.serve.app import BackgroundServer, start_in_thread
from minillm.serve.pd_decode import PrefillPairError
from minillm.testing import HTTPProcess, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 300  # a busy 2-core CI machine loading a model and compiling kernels
KEY = "pd-test-key"


# ---------------------------------------------------------------------------- helpers
def pd_server(model: Path | str, port: int, *extra: str) -> HTTPProcess:
    """`minillm serve MODEL EXTRA...` in a subprocess, with the pair's key, one thread."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"minillm-pd-{port}.log"
    env = {"OMP_NUM_THREADS": "1"}
    env["NUMBA_CACHE_DIR"] = os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
    args = ["--threads", "1", "--api-key", KEY, "--log-level", "warning", *extra]
    return HTTPProcess.minillm("serve", str(model), *args, port=port, log=log, env=env)


def metric(base_url: str, name: str) -> float:
    """The sum of a metric's samples on a server's /metrics (all label sets)."""
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = [
        float(m.group(1))
        for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    ]
    assert values, f"{name} is not on {base_url}/metrics"
    return sum(values)


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=300)


def assert_no_leftovers(llm: LLM) -> None:
    """No request and no KV block held: what a failed request must leave behind."""
    eng = llm.engine
    deadline = time.monotonic() + 60
    while eng.requests and time.monotonic() < deadline:
        time.sleep(0.05)  # an abort travels through the engine thread's command queue
    assert not eng.requests
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
    ]
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pd") / "tiny")


@pytest.fixture(scope="module")
def pair(tiny, free_port) -> Iterator[tuple[HTTPProcess, HTTPProcess]]:
    """A prefill server and its decode server, started together (different block sizes: the
    wire carries token slots, not blocks)."""
    common = ("--backend", "ref", "--max-model-len", "256")
    prefill = pd_server(
        tiny, free_port(), *common, "--block-size", "4", "--disaggregation-mode", "prefill"
    )
    decode = pd_server(
        tiny, free_port(), *common, "--block-size", "8",
        "--disaggregation-mode", "decode", "--prefill-url", prefill.url,
    )  # fmt: skip
    try:
        yield prefill.wait_ready(START_DEADLINE_S), decode.wait_ready(START_DEADLINE_S)
    finally:
        decode.stop()
        prefill.stop()


@pytest.fixture(scope="module")
def colocated(tiny, free_port) -> Iterator[BackgroundServer]:
    """One ordinary server in this process: the reference answers."""
    llm = LLM(str(tiny), backend="ref", max_model_len=256)
    server = start_in_thread(build_app(llm, api_key=KEY), port=free_port())
    try:
        yield server
    finally:
        server.stop()


MESSAGES = [{"role": "user", "content": "KV cache, paged attention and quantization."}]


def chat(base_url: str, stream: bool = False, **kw: Any) -> tuple[str, Any]:
    """(text, usage) of one chat completion; streamed chunks are joined."""
    c = client(base_url)
    model = c.models.list().data[0].id
    if not stream:
        r = c.chat.completions.create(model=model, messages=MESSAGES, **kw)
        return r.choices[0].message.content, r.usage
    parts, usage = [], None
    for chunk in c.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw
    ):
        parts += [ch.delta.content or "" for ch in chunk.choices]
        usage = chunk.usage or usage
    return "".join(parts), usage


# ---------------------------------------------------------------------------- the pair
@pytest.mark.parametrize("stream", [False, True], ids=["reply", "stream"])
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0, "max_tokens": 24},
        {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_tokens": 24},
    ],
    ids=["greedy", "seeded"],
)
def test_pair_answers_like_one_server(pair, colocated, stream, sampling):
    _, decode = pair
    want_text, want_usage = chat(colocated.url, stream, **sampling)
    got_text, got_usage = chat(decode.url, stream, **sampling)
    assert want_usage.completion_tokens > 1  # decoding really continued on the decode server
    assert got_text == want_text
    assert got_usage.prompt_tokens == want_usage.prompt_tokens
    assert got_usage.completion_tokens == want_usage.completion_tokens


def test_completions_with_logprobs_like_one_server(pair, colocated):
    _, decode = pair
    kw = dict(prompt="The quick brown fox", max_tokens=8, logprobs=3, seed=5, temperature=0.7)
    want = client(colocated.url).completions.create(model="tiny", **kw).choices[0]
    got = client(decode.url).completions.create(model="tiny", **kw).choices[0]
    assert got.text == want.text
    assert got.logprobs.tokens == want.logprobs.tokens
    assert got.logprobs.token_logprobs == pytest.approx(want.logprobs.token_logprobs, abs=1e-4)
    assert got.logprobs.top_logprobs[0] == pytest.approx(want.logprobs.top_logprobs[0], abs=1e-4)


def test_kv_bytes_per_request_match_the_formula(pair, tiny):
    prefill, decode = pair
    cfg = json.loads((tiny / "config.json").read_text())
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    name, hist = "minillm:kv_transfer_bytes_total", "minillm:kv_transfer_seconds_count"
    before = {s.url: (metric(s.url, name), metric(s.url, hist)) for s in pair}
    _, usage = chat(decode.url, temperature=0, max_tokens=4)
    # 2 (K and V) x layers x prompt tokens x KV heads x head dim x 4 bytes (float32 elements)
    expected = 2 * layers * usage.prompt_tokens * kv_heads * head_dim * 4
    assert KVLayout(layers, kv_heads, head_dim).bytes_for(usage.prompt_tokens) == expected
    for s in (prefill, decode):
        # the prefill server books its side once the end frame is handed to its socket, which
        # can be a moment after the decode server has read it
        deadline = time.monotonic() + 60
        while metric(s.url, name) == before[s.url][0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(s.url, name) - before[s.url][0] == expected
        assert metric(s.url, hist) - before[s.url][1] == 1


def test_prefix_hits_on_the_prefill_server(pair):
    prefill, decode = pair
    shared = {"role": "system", "content": "Large language models predict the next token. " * 4}
    hits = "vllm:prefix_cache_hits_total"
    c = client(decode.url)

    def ask(question: str) -> Any:
        messages = [shared, {"role": "user", "content": question}]
        return c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, temperature=0
        )

    ask("One?")
    before = metric(prefill.url, hits)
    r = ask("Two?")
    gained = metric(prefill.url, hits) - before
    assert gained >= 4  # at least one whole block (4 tokens on the prefill server)
    assert r.usage.prompt_tokens_details.cached_tokens == gained  # reported to the client


def test_internal_endpoint_is_not_a_public_api(pair, colocated):
    prefill, _ = pair
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt_token_ids": [1, 2], "sampling": {}, "fingerprint": "x", "request_id": "r"}
    url = f"{prefill.url}/internal/pd/prefill"
    assert httpx.post(url, json=body).status_code == 401  # the API key guards it
    refused = httpx.post(url, json=body, headers=auth)  # an ordinary client, by mistake
    assert refused.status_code == 403 and "internal" in refused.json()["error"]["message"]
    assert "/internal/pd" not in httpx.get(f"{prefill.url}/openapi.json", headers=auth).text
    plain = httpx.post(f"{colocated.url}/internal/pd/prefill", json=body, headers=auth)
    assert plain.status_code == 404  # only prefill servers have it


# ---------------------------------------------------------------------------- failures
@contextlib.contextmanager
def decode_server(model: Path, prefill_url: str, port: int) -> Iterator[tuple[LLM, FastAPI, str]]:
    """A decode server in this process, so a test can look at its engine's blocks."""
    llm = LLM(str(model), backend="ref", max_model_len=256)
    app = build_app(llm, api_key=KEY, disaggregation_mode="decode", prefill_url=prefill_url)
    server = start_in_thread(app, port=port)
    try:
        yield llm, app, server.url
    finally:
        server.stop()


def failed_chat(base_url: str, stream: bool) -> openai.APIError:
    with pytest.raises(openai.APIError) as e:
        chat(base_url, stream, temperature=0, max_tokens=4)
    return e.value


def status_of(err: openai.APIError) -> int | None:
    """The HTTP status (a reply) or the error event's code (a stream that had started)."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code
    return (err.body or {}).get("code") if isinstance(err.body, dict) else None


@pytest.mark.parametrize("stream", [False, True], ids=["reply", "stream"])
def test_prefill_server_down(tiny, free_port, stream):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with decode_server(tiny, dead, free_port()) as (llm, app, url):
        assert "not reachable" in app.state.serving.prefill_client.check_pair()
        err = failed_chat(url, stream)
        assert "unreachable" in str(err) and dead in str(err)
        assert status_of(err) == 503
        assert httpx.get(f"{url}/health").status_code == 200
        assert_no_leftovers(llm)


def test_wrong_url_is_not_a_prefill_server(tiny, free_port, colocated):
    with decode_server(tiny, colocated.url, free_port()) as (llm, app, url):
        with pytest.raises(PrefillPairError, match="not a prefill server"):
            app.state.serving.prefill_client.check_pair()
        err = failed_chat(url, stream=False)
        assert status_of(err) == 502 and "is not a prefill server" in str(err)
        assert_no_leftovers(llm)


def test_prefill_server_with_another_model(tmp_path, free_port, pair):
    prefill, _ = pair
    other = make_tiny_model(tmp_path / "other", seed=1)  # the same shapes, other weights
    with decode_server(other, prefill.url, free_port()) as (llm, app, url):
        with pytest.raises(PrefillPairError, match="must load the same model"):
            app.state.serving.prefill_client.check_pair()  # at start-up
        err = failed_chat(url, stream=False)  # and on every request
        assert status_of(err) == 502 and "same model file" in str(err)
        assert_no_leftovers(llm)


def test_cli_refuses_a_pair_of_different_models(tmp_path, free_port, pair):
    prefill, _ = pair
    other = make_tiny_model(tmp_path / "other", seed=2)
    server = pd_server(
        other, free_port(), "--backend", "ref", "--disaggregation-mode", "decode",
        "--prefill-url", prefill.url,
    )  # fmt: skip
    try:
        assert server.proc.wait(START_DEADLINE_S) != 0
    finally:
        server.stop()
    out = server.output()
    assert "must load the same model" in out and "Traceback" not in out


def cutting_proxy(target: str, abrupt: bool) -> FastAPI:
    """Forwards to the prefill server, but sends only half of each K/V stream: then ends it
    cleanly (a stream that stops early) or fails it (a connection reset midway)."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        body = await request.body()
        upstream = await asyncio.to_thread(
            httpx.request, request.method, f"{target}/{path}", content=body, headers=headers
        )
        if not path.endswith("prefill") or upstream.status_code != 200:
            return Response(upstream.content, upstream.status_code)
        half = upstream.content[: len(upstream.content) // 2]

        async def halves() -> AsyncIterator[bytes]:
            yield half
            if abrupt:
                raise ConnectionResetError("cut by the test")

        return StreamingResponse(halves(), media_type=upstream.headers["content-type"])

    return app


@pytest.mark.parametrize("abrupt", [False, True], ids=["ends-early", "reset"])
def test_transfer_cut_midway(tiny, free_port, pair, abrupt):
    prefill, _ = pair
    proxy = start_in_thread(cutting_proxy(prefill.url, abrupt), port=free_port())
    try:
        with decode_server(tiny, proxy.url, free_port()) as (llm, _app, url):
            err = failed_chat(url, stream=False)
            assert status_of(err) == 502 and "cut midway" in str(err)
            assert_no_leftovers(llm)
    finally:
        proxy.stop()


def test_decode_server_refuses_n_above_one(pair):
    _, decode = pair
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client(decode.url).completions.create(model="tiny", prompt="hi", n=2, max_tokens=2)


def test_prefill_server_dies_later(tiny, free_port):
    """The pair worked, then the prefill server went away: requests get a 503, not a hang."""
    prefill = pd_server(
        tiny, free_port(), "--backend", "ref", "--disaggregation-mode", "prefill"
    ).wait_ready(START_DEADLINE_S)
    try:
        with decode_server(tiny, prefill.url, free_port()) as (llm, _app, url):
            assert chat(url, temperature=0, max_tokens=3)[0] is not None
            prefill.stop()
            err = failed_chat(url, stream=False)
            assert status_of(err) == 503 and "unreachable" in str(err)
            assert_no_leftovers(llm)
    finally:
        prefill.stop()


# ---------------------------------------------------------------------------- bundled model
def test_smollm2_pair_greedy(bundled_gguf_path, free_port):
    prefill = pd_server(bundled_gguf_path, free_port(), "--disaggregation-mode", "prefill")
    decode = pd_server(
        bundled_gguf_path, free_port(), "--disaggregation-mode", "decode",
        "--prefill-url", prefill.url,
    )  # fmt: skip
    try:
        prefill.wait_ready(START_DEADLINE_S), decode.wait_ready(START_DEADLINE_S)
        llm = LLM(str(bundled_gguf_path))
        server = start_in_thread(build_app(llm, api_key=KEY), port=free_port())
        try:
            kw = dict(temperature=0, max_tokens=20)
            want = chat(server.url, **kw)[0]
            assert chat(decode.url, **kw)[0] == want
            assert chat(decode.url, stream=True, **kw)[0] == want
        finally:
            server.stop()
    finally:
        decode.stop()
        prefill.stop()


# ---------------------------------------------------------------------------- backends
KV_SLOTS_ON_THE_CUDA_BACKEND = """
import numpy as np, torch
from minillm.kernels import cuda as backend
from minillm.kv.cache import KVCache
device, host = KVCache(3, 6, 4, 2, 8, backend), KVCache(3, 6, 4, 2, 8, None)
for i, (d, h) in enumerate(zip(device.k + device.v, host.k + host.v)):
    start = torch.randn((6, 4, 2, 8), generator=torch.Generator().manual_seed(i))
    d.copy_to_device(start.numpy()); h.copy_(start)
slots = [5, 6, 7, 8, 17, 2]  # a partial block, a whole one, scattered ones
assert torch.equal(device.read_slots(slots), host.read_slots(slots))
data = torch.randn(2, 3, len(slots), 2, 8)
device.write_slots(slots, data); host.write_slots(slots, data)
for d, h in zip(device.k + device.v, host.k + host.v):
    assert np.array_equal(d.copy_to_host(), h.numpy())
print("ok", type(device.k[0]).__name__)
"""


def test_kv_slots_through_the_cuda_backend():
    """The cuda backend reads and writes a PD request's slots in its device cache exactly as
    the host cache does (under Numba's CUDA simulator, so it runs without a GPU)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KV_SLOTS_ON_THE_CUDA_BACKEND],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok") and "CUDA" in done.stdout
