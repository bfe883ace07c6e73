"""Work that one request can make the server do is bounded, and other clients do not wait for it.

A user's template renders in a worker process under a time, memory and output budget
(minillm.chat_sandbox); big bodies are parsed and tokenized off the event loop. Each test runs
the expensive request while a prober times /health and good streams run, and checks that
neither stalled. The bounds are loose (a busy 2-core CI machine), the stalls they catch were
not: before the fix a runaway template froze /health for 25 s and a 5 MB body for 2-7 s.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from minillm import LLM
from minillm.chat_sandbox import TemplateBudgetError, TemplateSandbox
from minillm.hub.modelfile import parse_modelfile
from minillm.serve import build_app, run_in_thread
from minillm.serve.bad_input import RUNAWAY
from minillm.testing import CHATML, make_tiny_model, slowed_steps

MSGS = [{"role": "user", "content": "hello"}]
STALL = 1.0  # seconds; what counts as a stall on a loaded CI machine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=13)


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def server(llm, free_port):
    with run_in_thread(build_app(llm, served_model_name="tiny"), port=free_port()) as srv:
        yield srv


@pytest.fixture
def slow_engine(llm):
    """Each engine step takes at least 10 ms, so the good streams outlast the bad request."""
    with slowed_steps(llm.engine):
        yield


class Prober:
    """Times GET /health back to back (about every 20 ms) on its own thread."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                assert client.get(self.url + "/health").status_code == 200
                self.latencies.append(time.perf_counter() - t0)
                self.stop.wait(0.02)


class GoodStream:
    """A long streaming chat; records when each chunk arrived."""

    def __init__(self, url: str, i: int) -> None:
        self.url, self.i, self.times, self.done = url, i, [], False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"stream {self.i}"}],
            "max_tokens": 150,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    self.times.append(time.perf_counter())
                    self.started.set()
                    self.done = line == "data: [DONE]"

    def worst_gap(self, start: float, end: float) -> float:
        """The longest wait for a chunk that overlaps [start, end]."""
        t = [x for x in self.times]
        gaps = [b - a for a, b in zip(t, t[1:], strict=False) if b >= start and a <= end]
        return max(gaps, default=0.0)


@contextmanager
def watched(url: str, streams: int = 4) -> Iterator[tuple[Prober, list[GoodStream]]]:
    prober, good = Prober(url), [GoodStream(url, i) for i in range(streams)]
    prober.thread.start()
    for g in good:
        g.thread.start()
    for g in good:
        assert g.started.wait(60), "a good stream never started"
    try:
        yield prober, good
    finally:
        prober.stop.set()
        prober.thread.join(60)
        for g in good:
            g.thread.join(120)


def test_a_runaway_template_is_stopped_and_nobody_waits_for_it(server, slow_engine):
    body = {"model": "tiny", "prompt": "hi", "stream": False, "template": RUNAWAY}
    with watched(server.url) as (prober, good):
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/api/generate", json=body, timeout=120)
        elapsed = time.perf_counter() - t0
        during = len(prober.latencies)
    assert r.status_code == 400, r.text
    assert "template: the template took longer than 1 s" in r.json()["error"]
    # the 1 s budget, then a kill (not 25 s of loops); the rest allows for starting the
    # first worker process on a loaded machine
    assert elapsed < 1 + 9, elapsed
    assert during >= 5, "the prober hardly ran"
    assert max(prober.latencies) < STALL, max(prober.latencies)
    assert all(g.done for g in good)
    worst = max(g.worst_gap(t0, t0 + elapsed) for g in good)
    assert worst < STALL, worst
    ok = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    assert httpx.post(server.url + "/api/generate", json=ok, timeout=60).status_code == 200


def test_a_5mb_body_is_read_and_refused_off_the_event_loop(server, slow_engine):
    text = "the quick brown fox 大模型 " * 200_000  # 6 MB of JSON: under the 8 MiB default
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}]})
    with watched(server.url) as (prober, good):
        t0 = time.perf_counter()
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
        )
        elapsed = time.perf_counter() - t0
    assert r.status_code == 400 and "context length is 256 tokens" in r.text, r.text[:300]
    assert max(prober.latencies) < STALL, (max(prober.latencies), elapsed)
    assert all(g.done for g in good)
    assert max(g.worst_gap(t0, t0 + elapsed) for g in good) < STALL


def test_a_modelfile_template_has_the_same_budget(tiny_dir, free_port):
    spec = parse_modelfile(f'FROM {tiny_dir}\nTEMPLATE """{RUNAWAY}"""\n')
    llm = LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")
    app = build_app(llm, served_model_name="tiny", profile=spec, template_timeout=0.5)
    with run_in_thread(app, port=free_port()) as srv:
        t0 = time.perf_counter()
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": MSGS, "max_tokens": 2},
            timeout=60,
        )
        assert time.perf_counter() - t0 < 0.5 + 9  # the budget, and a worker's start
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "took longer than 0.5 s" in err["message"] and err["param"] == "messages"
        raw = {"model": "tiny", "prompt": "hi", "max_tokens": 2}  # no template involved
        assert httpx.post(srv.url + "/v1/completions", json=raw, timeout=60).status_code == 200


def test_tokenizing_off_the_loop_gives_the_tokenizers_ids(server, llm):
    from minillm.serve.engine_client import ServingEngine

    serving: ServingEngine = server.server.config.app.state.serving
    texts = ["hello", "<|im_start|>user\n大模型 hi<|im_end|>\n", "x " * 300, "emoji 😀 ok"]
    for text in texts:
        expected = llm.tokenizer.encode(text)
        count, ids = _run(serving.tokenize(text, keep=10_000))
        assert (count, ids) == (len(expected), expected)
        count, ids = _run(serving.tokenize(text, keep=3))
        assert (count, ids) == (len(expected), expected[:3])  # the count is the whole text's


def _run(coro):
    import asyncio

    return asyncio.run(coro)


# ---------------------------------------------------------------------------- the sandbox
@pytest.fixture(scope="module")
def sandbox() -> Iterator[TemplateSandbox]:
    box = TemplateSandbox(workers=1, timeout=0.5)
    yield box
    box.close()


def test_the_sandbox_renders_like_the_chat_template(sandbox):
    from minillm.chat import ChatTemplate

    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    assert sandbox.render(CHATML, convo) == ChatTemplate(CHATML).render(convo)
    go = "{{ if .System }}[S]{{ .System }}\n{{ end }}[U]{{ .Prompt }}\n[A]{{ .Response }}"
    assert sandbox.render(go, convo) == "[S]be brief\n[U]héllo\n[A]"


def test_a_runaway_is_killed_and_the_next_render_gets_a_fresh_worker(sandbox):
    t0 = time.perf_counter()
    with pytest.raises(TemplateBudgetError, match="longer than 0.5 s"):
        sandbox.render(RUNAWAY, MSGS)
    assert time.perf_counter() - t0 < 0.5 + 4
    assert sandbox.render(CHATML, MSGS).startswith("<|im_start|>user\nhello")


def test_output_and_errors_come_back_as_value_errors(sandbox):
    with pytest.raises(ValueError, match="longer than 100 characters"):
        sandbox.render("{% for i in range(1000) %}xy{% endfor %}", MSGS, max_chars=100)
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        sandbox.render("{{ 1 / 0 }}", MSGS)
    with pytest.raises(ValueError, match="syntax error"):
        sandbox.render("{% if %}", MSGS)


@pytest.mark.skipif(sys.platform != "linux", reason="the worker's memory cap is Linux's RLIMIT_AS")
def test_a_memory_bomb_hits_the_workers_cap_not_the_server(sandbox):
    with pytest.raises(ValueError, match="MiB of memory"):
        sandbox.render("{{ '{:>9999999999}'.format(1) }}", MSGS)  # 10 GB in one C call
    assert sandbox.render(CHATML, MSGS)
