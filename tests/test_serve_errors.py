"""Bad input gets a 4xx whose message names the problem, and the server serves the next request.

The matrix (minillm/serve/bad_input.py, shared with benchmarks/probe_bad_input.py) follows
every case with a good request on the same server; at the end the engine thread is still alive,
nothing is left in the engine, no admission is left open and every KV block is free.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from minillm import LLM
from minillm.serve import build_app, run_in_thread
from minillm.serve.bad_input import CASES, KEY, LLM_KWARGS, MSGS, case_app, problems, send
from minillm.testing import make_tiny_model

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=7)


def load(path) -> LLM:
    return LLM(str(path), **LLM_KWARGS)


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return load(tiny_dir)


@pytest.fixture
def own_llm(tiny_dir) -> LLM:
    """A second engine for tests that start their own server: one engine, one engine thread."""
    return load(tiny_dir)


@pytest.fixture(scope="module")
def app(llm):
    return case_app(llm)


@pytest.fixture(scope="module")
def server(app, free_port):
    with run_in_thread(app, port=free_port()) as srv:
        yield srv


def good_request_works(url: str) -> None:
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=AUTH,
        json={"model": "tiny", "messages": MSGS, "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_matrix(server, case):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = send(client, case)
    assert not problems(case, r), (problems(case, r), r.text[:300])
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


def test_api_key_guards_everything_but_the_probes(server):
    closed = ("/v1/models", "/api/tags", "/docs", "/redoc", "/openapi.json", "/metrics")
    for path in closed:
        missing = httpx.get(server.url + path)
        assert missing.status_code == 401 and "missing API key" in missing.text, path
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200, path
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "tiny", "messages": MSGS},
        headers={"Authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and "wrong API key" in r.json()["error"]  # Ollama shape
    for path in ("/", "/health", "/version", "/api/version"):
        assert httpx.get(server.url + path).status_code == 200, path


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


@pytest.fixture
def gate(own_llm):
    """Engine steps wait until the test opens the gate, so requests stay in flight."""
    opened = threading.Event()
    real_step = own_llm.engine.step

    def gated():
        assert opened.wait(60), "the test never opened the gate"
        return real_step()

    own_llm.engine.step = gated
    yield opened
    opened.set()
    own_llm.engine.step = real_step


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_overloaded_server_says_503_and_recovers(own_llm, free_port, gate):
    app = build_app(own_llm, served_model_name="tiny", max_queued_requests=1)
    serving = app.state.serving
    with run_in_thread(app, port=free_port()) as srv:
        body = {"model": "tiny", "messages": MSGS, "max_tokens": 4, "stream": True}
        lines: list[str] = []

        def long_stream():
            with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=long_stream)
        t.start()
        wait_for(lambda: serving.in_flight == 1)
        busy = httpx.post(srv.url + CHAT, json={"model": "tiny", "messages": MSGS})
        gate.set()
        t.join(60)
        assert busy.status_code == 503 and "overloaded" in busy.json()["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        ok = httpx.post(srv.url + CHAT, json={"model": "tiny", "messages": MSGS, "max_tokens": 2})
        assert ok.status_code == 200


def test_an_internal_error_is_logged_with_an_id_and_not_shown(server, llm, caplog):
    """A bug is a 500 that gives an id to quote; the exception's text, which can carry paths
    and prompts, goes only to the log."""
    real = llm.engine.add_request

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/someone/model.gguf")

    llm.engine.add_request = broken
    try:
        with caplog.at_level(logging.ERROR, logger="minillm.serve"):
            replies = [
                httpx.post(
                    server.url + CHAT,
                    headers=AUTH,
                    json={"model": "tiny", "messages": MSGS, "max_tokens": 2},
                ),
                httpx.post(
                    server.url + "/api/chat",
                    headers=AUTH,
                    json={"model": "tiny", "messages": MSGS, "stream": False},
                ),
                httpx.post(
                    server.url + CHAT,
                    headers=AUTH,
                    json={"model": "tiny", "messages": MSGS, "max_tokens": 2, "stream": True},
                ),
            ]
    finally:
        llm.engine.add_request = real
    for r in replies:
        assert "secret" not in r.text and "RuntimeError" not in r.text, r.text
        error_id = re.search(r"internal server error \(id (err-[0-9a-f]+);", r.text).group(1)
        logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
        assert len(logged) == 1 and "secret detail" in str(logged[0].exc_info[1])
    assert [r.status_code for r in replies] == [500, 500, 200]  # a stream reports an event
    good_request_works(server.url)


def test_capacity_counts_sequences_and_refuses_a_stream_before_its_header(own_llm, free_port, gate):
    app = build_app(own_llm, served_model_name="tiny", max_queued_requests=4)
    serving = app.state.serving
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 3, "stream": True}
    with run_in_thread(app, port=free_port()) as srv:
        held: list[str] = []

        def stream_n4():
            with httpx.stream("POST", srv.url + CHAT, json={**body, "n": 4}, timeout=60) as r:
                held.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream_n4)
        t.start()
        wait_for(lambda: serving.in_flight == 4)  # one request, four sequences
        with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as r:
            status, refused = r.status_code, json.loads(r.read())
        assert status == 503, refused  # the status itself, not a 200 and an error event
        assert "4 sequences in flight and this request needs 1 (limit 4)" in str(refused)
        six = httpx.post(
            srv.url + "/v1/completions",
            json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1},
        )
        assert six.status_code == 400 and "needs 6 sequences (3 prompts x n=2)" in six.text
        gate.set()
        t.join(60)
        assert held[-1] == "data: [DONE]"
        wait_for(lambda: serving.in_flight == 0)  # released once the stream was sent
        again = httpx.post(srv.url + CHAT, json={**body, "n": 4, "stream": False}, timeout=60)
        assert again.status_code == 200 and len(again.json()["choices"]) == 4
        assert serving.in_flight == 0


def test_after_all_that_the_engine_is_healthy_and_empty(server, llm, app):
    good_request_works(server.url)
    deadline = time.monotonic() + 10
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert not llm.engine.has_unfinished_requests()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert app.state.serving.in_flight == 0
