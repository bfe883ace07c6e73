"""Bad input gets a 4xx whose message names the problem, and the server serves the next request.

Every case of the matrix is followed by a good request on the same server; at the end the
engine thread is still alive, nothing is left in the engine and every KV block is free.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from minillm import LLM
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model

KEY = "sk-test-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=7)


def load(path) -> LLM:
    return LLM(str(path), backend="ref", block_size=4, kv_cache_memory="4MiB", max_model_len=64)


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return load(tiny_dir)


@pytest.fixture
def own_llm(tiny_dir) -> LLM:
    """A second engine for tests that start their own server: one engine, one engine thread."""
    return load(tiny_dir)


@pytest.fixture(scope="module")
def server(llm, free_port):
    with run_in_thread(
        build_app(llm, api_key=KEY, served_model_name="tiny"), port=free_port()
    ) as srv:
        yield srv


def good_request_works(url: str) -> None:
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=AUTH,
        json={"model": "tiny", "messages": MSGS, "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


LONG = "the quick brown fox " * 40  # far more than max_model_len=64 tokens
CHAT = "/v1/chat/completions"


# (path, raw body or JSON, status, words the message must contain, param)
CASES = [
    (CHAT, b"{not json", 422, "not valid JSON", None),
    (CHAT, b"[1, 2]", 422, "JSON object", None),
    (CHAT, {"model": "tiny"}, 422, "messages: Field required", "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages is empty", "messages"),
    (
        CHAT,
        {"model": "tiny", "messages": "hello"},
        422,
        "messages: Input should be a valid list",
        "messages",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "unknown role 'wizard'",
        "messages",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
        400,
        "content must be a str",
        "messages",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "temperature": "hot"},
        422,
        "temperature",
        "temperature",
    ),
    (CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 1.5}, 422, "max_tokens", "max_tokens"),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "temperature": -0.5},
        400,
        "temperature must be >= 0",
        "temperature",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "top_p": 1.5},
        400,
        "top_p must be in (0, 1]",
        "top_p",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "presence_penalty": 3},
        400,
        "presence_penalty must be in [-2, 2]",
        "presence_penalty",
    ),
    (CHAT, {"model": "tiny", "messages": MSGS, "n": 0}, 400, "n must be at least 1", "n"),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "max_tokens": 0},
        400,
        "max_tokens must be at least 1",
        "max_tokens",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "logprobs": True, "top_logprobs": 50},
        400,
        "logprobs must be None or in [0, 20]",
        "logprobs",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "top_logprobs": 2},
        400,
        "top_logprobs requires logprobs=true",
        "top_logprobs",
    ),
    (CHAT, {"model": "gpt-4", "messages": MSGS}, 404, "'gpt-4' does not exist", "model"),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": LONG}]},
        400,
        "context length is 64 tokens",
        "messages",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "max_tokens": 1000},
        400,
        "max_tokens=1000 is too large",
        "max_tokens",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": MSGS, "logit_bias": {"5": 1.0}},
        400,
        "logit_bias is not supported",
        "logit_bias",
    ),
    ("/v1/completions", {"model": "tiny"}, 422, "prompt: Field required", "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt is empty", "prompt"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": [999999]},
        400,
        "token ids must be in",
        "prompt",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "context length is 64", "prompt"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "stop": [""]},
        400,
        "stop strings must not be empty",
        "stop",
    ),
    ("/v1/embeddings", {"model": "tiny", "input": LONG}, 400, "context length is 64", "input"),
    (
        "/v1/embeddings",
        {"model": "tiny", "input": "x", "dimensions": 3},
        400,
        "dimensions",
        "dimensions",
    ),
    ("/v1/nothing-here", {}, 404, "no route POST /v1/nothing-here", None),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle", "param"),
    CASES,
    ids=[f"{c[0]}-{c[2]}-{c[3][:24]}" for c in CASES],
)
def test_bad_input_matrix(server, path, body, status, needle, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(
        server.url + path, headers={**AUTH, "content-type": "application/json"}, **kwargs
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]
    assert err["param"] == param and err["code"] == status
    good_request_works(server.url)


def test_openai_sdk_raises_the_matching_exceptions(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="tiny", messages=MSGS, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        c.chat.completions.create(model="tiny", messages="hi")  # type: ignore[arg-type]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        wrong.models.list()
    good_request_works(server.url)


def test_api_key_guards_both_apis_but_not_probes(server):
    for path in ("/v1/models", "/api/tags"):
        missing = httpx.get(server.url + path)
        assert missing.status_code == 401 and "missing API key" in missing.text
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "tiny", "messages": MSGS},
        headers={"Authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and "wrong API key" in r.json()["error"]  # Ollama shape
    for path in ("/health", "/metrics", "/version", "/api/version"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


def test_a_stream_that_fails_late_ends_with_an_error_event(server, llm):
    """Errors after streaming began cannot change the status: they come as an event."""
    real = llm.engine.add_request

    def refuse(*args, **kwargs):
        raise ValueError("refused by the test")

    llm.engine.add_request = refuse
    try:
        with httpx.stream(
            "POST",
            server.url + CHAT,
            headers=AUTH,
            json={"model": "tiny", "messages": MSGS, "max_tokens": 3, "stream": True},
        ) as r:
            lines = [x for x in r.iter_lines() if x]
    finally:
        llm.engine.add_request = real
    assert r.status_code == 200
    assert "refused by the test" in lines[-2] and '"code": 400' in lines[-2]
    assert lines[-1] == "data: [DONE]"
    good_request_works(server.url)


def test_engine_not_running_is_503(own_llm):
    app = build_app(own_llm, served_model_name="tiny")
    client = TestClient(app)  # no `with`: the lifespan (and the engine thread) never starts
    r = client.post(CHAT, json={"model": "tiny", "messages": MSGS})
    assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503
    o = client.post("/api/chat", json={"model": "tiny", "messages": MSGS})
    assert o.status_code == 503 and "not running" in o.json()["error"]
    with TestClient(app) as started:
        assert started.get("/health").json() == {"status": "ok"}
        ok = started.post(CHAT, json={"model": "tiny", "messages": MSGS, "max_tokens": 2})
        assert ok.status_code == 200


def test_overloaded_server_says_503_and_recovers(own_llm, free_port):
    app = build_app(own_llm, served_model_name="tiny", max_queued_requests=1)
    with run_in_thread(app, port=free_port()) as srv:
        body = {
            "model": "tiny",
            "messages": MSGS,
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
        }
        started = threading.Event()
        lines: list[str] = []

        def long_stream():
            with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    started.set()
                    if line:  # SSE events are separated by blank lines
                        lines.append(line)

        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(30)
        busy = httpx.post(srv.url + CHAT, json={"model": "tiny", "messages": MSGS})
        t.join(60)
        assert busy.status_code == 503 and "overloaded" in busy.json()["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        ok = httpx.post(srv.url + CHAT, json={"model": "tiny", "messages": MSGS, "max_tokens": 2})
        assert ok.status_code == 200


def test_after_all_that_the_engine_is_healthy_and_empty(server, llm):
    good_request_works(server.url)
    deadline = time.monotonic() + 10
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert not llm.engine.has_unfinished_requests()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
