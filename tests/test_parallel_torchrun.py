"""The same workers under torchrun (minillm/parallel/launch.py): `torchrun --nproc-per-node 2
-m minillm.parallel.launch generate MODEL -tp 2` (and -pp 2) on one machine prints the tokens
one process generates; `... serve MODEL -tp 2` answers like one process; neither leaves a
process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from minillm import LLM, SamplingParams
from minillm.testing import make_tiny_model

DEADLINE_S = 300.0
PROMPTS = ["The quick brown fox", "def add(a, b):"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("torchrun") / "llama",
        "llama",
        seed=0,
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=12,
        num_key_value_heads=6,
    )


def _processes_using(path: Path) -> list[int]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(path) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                out.append(proc.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize(("flag", "backend"), [("-tp", "ref"), ("-pp", "cpu")])
def test_torchrun_workers_generate_what_one_process_does(
    model: Path, flag: str, backend: str
) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [
        o.outputs[0].token_ids for o in LLM(str(model), backend=backend).generate(PROMPTS, params)
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "minillm.parallel.launch", "generate", str(model), flag, "2"]
    cmd += ["--backend", backend, "--max-tokens", "6"]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILLM_TP_TIMEOUT_S": "60"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    finally:
        leftover = _processes_using(model)
        for pid in leftover:
            psutil.Process(pid).kill()
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["token_ids"] for r in rows] == want
    assert not leftover, f"processes outlived torchrun: {leftover}"


def test_a_server_under_torchrun_answers_and_stops_with_torchrun(
    model: Path, free_port: Callable[[], int], tmp_path: Path
) -> None:
    """`torchrun ... -m minillm.parallel.launch serve MODEL -tp 2`: rank 0 serves, rank 1 holds
    its shard; the answer is one process's, and SIGTERM to torchrun ends every rank."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(str(model), backend="ref").generate(PROMPTS[0], params)[0].outputs[0].text
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "minillm.parallel.launch", "serve", str(model), "-tp", "2", "--backend", "ref"]
    cmd += ["--port", str(port), "--served-model-name", "tiny"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILLM_TP_TIMEOUT_S": "60"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the torchrun server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json={**body, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + DEADLINE_S
        while _processes_using(model) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _processes_using(model)
        for pid in leftover:
            psutil.Process(pid).kill()
    assert not leftover, f"ranks outlived torchrun: {leftover}"
