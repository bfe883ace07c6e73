"""`minillm serve MODEL -tp 3` (and -pp 2): a real server process whose model is split over
processes answers through the openai SDK exactly as one process would (chat, streamed chat,
embeddings), and leaves no worker behind: not after SIGTERM, not after a worker is killed during
a request or while idle (the server then exits on its own with status 1 and names the dead
rank, never hangs), not after the server itself is killed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest

from minillm import LLM, SamplingParams
from minillm.testing import HTTPProcess, make_tiny_model

DEADLINE_S = 180.0  # generous: three processes load a model on a busy 2-core machine
MESSAGES = [{"role": "user", "content": "Say something about tensors."}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 heads, 6 KV heads, FFN 192: splits over 3 ranks."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tp-serve") / "llama",
        "llama",
        seed=0,
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=12,
        num_key_value_heads=6,
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Server(HTTPProcess):
    """`minillm serve MODEL -tp N -pp M` that also knows its spawned workers."""

    def __init__(self, model: Path, port: int, log: Path, flags: list[str]) -> None:
        env = {"MINILLM_TP_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "minillm.cli", "serve", str(model), *flags, "--backend",
               "ref", "--served-model-name", "tiny", "--port", str(port)]  # fmt: skip
        super().__init__(cmd, f"http://127.0.0.1:{port}", log, env)
        self.workers: list[int] = []

    def wait_healthy(self, num_workers: int) -> None:
        self.wait_ready(DEADLINE_S)
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.workers = [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(self.workers) == num_workers, self.workers

    def stop(self, grace: float = DEADLINE_S) -> int | None:
        """Whatever the test did: the server and every worker are gone afterwards."""
        code = super().stop(grace)
        for pid in self.workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        return code


@pytest.fixture
def start_server(free_port: Callable[[], int], tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(model: Path, tp: int = 1, pp: int = 1) -> Server:
        flags = ["-tp", str(tp), "-pp", str(pp)]
        server = Server(model, free_port(), tmp_path / f"server{len(servers)}.log", flags)
        servers.append(server)
        server.wait_healthy(tp * pp - 1)
        return server

    try:
        yield start
    finally:
        leftover = [pid for s in servers for pid in s.workers if _alive(pid)]
        for s in servers:
            s.stop()
        assert not leftover, f"workers outlived their test: {leftover}"


def test_a_tp3_server_answers_like_one_process_and_sigterm_leaves_no_worker(
    model: Path, start_server: Callable[..., Server]
) -> None:
    with LLM(str(model), backend="ref") as one:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        want = one.chat(MESSAGES, params)[0].outputs[0].text
        want_vector = one.engine.embed([one.tokenizer.encode("hello tensors")])[0]

    server = start_server(model, tp=3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    kwargs = dict(
        model="tiny",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == want
    chunks = client.chat.completions.create(**kwargs, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want

    vector = client.embeddings.create(model="tiny", input="hello tensors").data[0].embedding
    np.testing.assert_allclose(vector, want_vector, rtol=1e-4, atol=1e-5)  # every rank joins

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(DEADLINE_S) == 0, server.output()
    _wait_until(lambda: not any(_alive(p) for p in server.workers), "the workers to exit")


def test_a_killed_worker_fails_the_request_and_ends_the_server(
    model: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(model, tp=3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # the request is running on all three ranks
    victim = server.workers[1]
    os.kill(victim, signal.SIGSTOP)  # it cannot finish the request now: still in flight
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in stream:  # the stream ends with an error, never hangs
            pass
    assert server.proc.wait(DEADLINE_S) == 1, server.output()
    assert time.monotonic() - start < DEADLINE_S
    out = server.output()
    assert f"(pid {victim}) was killed by SIGKILL" in out, out
    assert "error: the server stopped because" in out, out
    _wait_until(lambda: not any(_alive(p) for p in server.workers), "the workers to exit")


def test_a_worker_killed_while_the_server_idles_ends_the_server(
    model: Path, start_server: Callable[..., Server]
) -> None:
    """A -pp 2 server answers like one process; then, with no request to notice, a killed
    worker still ends it: the server watches its workers and exits by itself."""
    with LLM(str(model), backend="ref") as one:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        want = one.generate("The quick brown fox", params)[0].outputs[0].text
    server = start_server(model, pp=2)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    reply = client.completions.create(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == want
    victim = server.workers[0]
    os.kill(victim, signal.SIGKILL)
    assert server.proc.wait(DEADLINE_S) == 1, server.output()
    out = server.output()
    assert f"parallel worker rank 1 (pid {victim}) was killed by SIGKILL" in out, out


def test_workers_do_not_outlive_a_killed_server(
    model: Path, start_server: Callable[..., Server]
) -> None:
    """SIGKILL gives the server no chance to stop anything: each worker sees its pipe close."""
    server = start_server(model, tp=3)
    server.proc.kill()
    server.proc.wait(DEADLINE_S)
    _wait_until(lambda: not any(_alive(p) for p in server.workers), "the orphaned workers to exit")
