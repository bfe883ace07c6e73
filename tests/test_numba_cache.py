"""One Numba kernel cache for every entry point, and a warm-up that fills it completely.

`make setup` compiles the cpu kernels into `.cache/numba`. A plain shell without
NUMBA_CACHE_DIR used to compile them again into `__pycache__` (33.7 s for the first
`minillm run`), because only make's own commands saw the variable. These tests start fresh
processes with the variable unset, as a student's shell has it, and check where Numba reads
and writes; the slow one warms an empty cache and checks that `minillm run` and the server's
paths then compile nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.numba_cache import CHECKOUT_CACHE, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / CHECKOUT_CACHE
MINILLM = Path(sys.executable).with_name("minillm")  # the console script `make setup` installs
CACHE_LINE = re.compile(r"\[cache\] (\w+ \w+) (?:from|to) '([^']+)'")


def plain_env(**extra: str) -> dict[str, str]:
    """The environment of a student's shell: no NUMBA_CACHE_DIR (this process has one now)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def cache_events(output: str) -> list[tuple[str, str]]:
    """(event, path) of each NUMBA_DEBUG_CACHE line: "index loaded", "data saved", ..."""
    return CACHE_LINE.findall(output)


PRINT_CACHE_DIRS = """
import os, subprocess, sys
{imports}
from minillm.kernels import cpu_layer
print(numba.config.CACHE_DIR)
print(cpu_layer.decode_layer._cache._cache_path)
print(subprocess.run([sys.executable, "-c", "import os; print(os.environ['NUMBA_CACHE_DIR'])"],
                     capture_output=True, text=True, check=True).stdout.strip())
"""


@pytest.mark.parametrize("imports", ["import minillm, numba", "import numba, minillm"])
def test_a_python_import_uses_the_checkouts_cache(imports):
    """Whichever is imported first, the kernels cache in .cache/numba, as do child processes
    (a Jupyter kernel, a worker)."""
    out = run([sys.executable, "-c", PRINT_CACHE_DIRS.format(imports=imports)], plain_env())
    config_dir, kernel_dir, child_dir = out.split()
    assert config_dir == child_dir == str(SHARED)
    assert Path(kernel_dir).parent == SHARED


def test_an_explicit_numba_cache_dir_wins(tmp_path):
    code = PRINT_CACHE_DIRS.format(imports="import minillm, numba")
    out = run([sys.executable, "-c", code], plain_env(NUMBA_CACHE_DIR=str(tmp_path)))
    config_dir, kernel_dir, child_dir = out.split()
    assert config_dir == child_dir == str(tmp_path)
    assert Path(kernel_dir).parent == tmp_path


def test_the_makefile_warms_the_same_directory():
    """make exports NUMBA_CACHE_DIR for its own commands; it must name what minillm picks."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    (value,) = re.findall(r"^export NUMBA_CACHE_DIR := (.+)$", makefile, re.MULTILINE)
    assert value.strip() == f"$(CURDIR)/{CHECKOUT_CACHE.as_posix()}"
    assert default_cache_dir() == SHARED


def test_an_installed_package_caches_per_user(tmp_path):
    site = tmp_path / "site-packages" / "minillm"
    site.mkdir(parents=True)
    xdg = tmp_path / "xdg"
    assert default_cache_dir(site, {"XDG_CACHE_HOME": str(xdg)}) == xdg / "minillm" / "numba"
    # A relative XDG_CACHE_HOME is ignored (XDG spec): ~/.cache then.
    home_cache = default_cache_dir(site, {"XDG_CACHE_HOME": "rel"})
    assert home_cache == Path.home() / ".cache" / "minillm" / "numba"
    # Another project's checkout is not ours: pyproject.toml must name minillm.
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert default_cache_dir(site, {"XDG_CACHE_HOME": str(xdg)}) == xdg / "minillm" / "numba"
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "minillm"\n')
    assert default_cache_dir(site, {}) == tmp_path / "site-packages" / CHECKOUT_CACHE


def test_the_cli_reads_and_writes_only_the_shared_cache():
    """`minillm run` from a plain shell: every cache file Numba touches is in .cache/numba."""
    cmd = [str(MINILLM), "run", "smollm2", "hi", "--max-tokens", "2", "--backend", "cpu"]
    events = cache_events(run(cmd, plain_env(NUMBA_DEBUG_CACHE="1")))
    assert events, "Numba reported no cache activity: did the cpu backend run?"
    outside = [path for _, path in events if Path(path).parent.parent != SHARED]
    assert not outside, outside


SERVER_PATHS = """
import sys, threading
import httpx
from minillm import LLM
from minillm.serve import build_app, run_in_thread

llm = LLM("smollm2", backend="cpu")
chat = {"model": "smollm2", "max_tokens": 24, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Tell me about paged attention."}]}
first_chunk = threading.Event()

def stream_one():
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first_chunk.set()

with run_in_thread(build_app(llm, served_model_name="smollm2"), port=int(sys.argv[1])) as srv:
    url = srv.url
    decoding = threading.Thread(target=stream_one)
    decoding.start()
    assert first_chunk.wait(300), "no streamed chunk"
    # a second client arrives while the first decodes: prefill and decode in one step
    body = {"model": "smollm2", "prompt": "Hello there, " * 8, "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=body, timeout=300).status_code == 200
    decoding.join(300)
    body = {"model": "smollm2", "input": ["an embedding", "two"]}
    assert httpx.post(url + "/v1/embeddings", json=body, timeout=300).status_code == 200
"""


@pytest.mark.slow
def test_after_the_warm_up_nothing_compiles_again(tmp_path, free_port):
    """The warm-up into an empty cache, then the real entry points: not one kernel compiles
    (Numba would print "data saved" for each signature it had to compile and store)."""
    env = plain_env(NUMBA_CACHE_DIR=str(tmp_path), NUMBA_DEBUG_CACHE="1")
    warm = cache_events(run([sys.executable, "-m", "minillm.kernels.warmup"], env))
    assert any(event == "data saved" for event, _ in warm)  # it compiled into the empty cache
    run_cmd = [str(MINILLM), "run", "smollm2", "What is a KV cache?", "--max-tokens", "8"]
    for cmd in (run_cmd, [sys.executable, "-c", SERVER_PATHS, str(free_port())]):
        events = cache_events(run(cmd, env))
        compiled = sorted({Path(path).name for event, path in events if "saved" in event})
        assert not compiled, f"{cmd[:3]} compiled what the warm-up missed: {compiled}"
        assert any(event == "data loaded" for event, _ in events)
