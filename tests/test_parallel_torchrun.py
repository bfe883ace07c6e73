"""The same workers under torchrun (minillm/parallel/launch.py): `torchrun --nproc-per-node 2
-m minillm.parallel.launch generate MODEL -tp 2` (and -pp 2) on one machine prints the tokens
one process generates, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
