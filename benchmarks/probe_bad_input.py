"""Every bad input at a live server while good clients use it: the robustness figure.

    python benchmarks/probe_bad_input.py [--streams 4] [--rounds 1] [--stall-ms 100]

Starts a real server (uvicorn on a thread) on the tiny test model, configured as the shared
matrix (minillm/serve/bad_input.py) assumes. While a prober GETs /health about every 20 ms and
a few good streams run chat completions back to back, every case of the matrix is sent and its
answer checked. Then, once the engine is idle, its KV blocks are counted. Printed and returned:

- cases, and how many got the clear 4xx they should (status, error shape, message);
- unintended 5xx (target 0): a case, a good stream or /health answered 5xx;
- event-loop stalls (target 0): /health answers slower than --stall-ms;
- lost requests (target 0): good streams that did not end with [DONE];
- leaked KV blocks and admissions (target 0): blocks not free and sequences still counted
  in flight once every request is over.

The exit status is 1 when a target is missed. The prober runs in the server's process (it has
to read the engine's blocks), so its latencies include its own share of the GIL: an upper bound.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from minillm import LLM
from minillm.serve import run_in_thread
from minillm.serve.bad_input import CASES, KEY, LLM_KWARGS, MODEL, case_app, problems, send
from minillm.serve.engine_client import ServingEngine
from minillm.testing import make_tiny_model

AUTH = {"authorization": f"Bearer {KEY}"}


@dataclass
class ProbeReport:
    cases: int = 0
    clear_4xx: int = 0
    unintended_5xx: int = 0
    stalls: int = 0
    lost: int = 0
    leaked_blocks: int = 0
    leaked_admissions: int = 0
    good_streams: int = 0
    health_checks: int = 0
    worst_health_ms: float = 0.0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # what missed a target, and why

    @property
    def ok(self) -> bool:
        targets = (self.unintended_5xx, self.stalls, self.lost)
        return self.clear_4xx == self.cases and not any(targets) and not self.leaks

    @property
    def leaks(self) -> int:
        return self.leaked_blocks + self.leaked_admissions

    def table(self) -> str:
        rows = [
            ("cases", self.cases),
            ("clear 4xx", self.clear_4xx),
            ("unintended 5xx (target 0)", self.unintended_5xx),
            ("event-loop stalls (target 0)", self.stalls),
            ("lost requests (target 0)", f"{self.lost} of {self.good_streams} good streams"),
            ("leaked KV blocks (target 0)", self.leaked_blocks),
            ("leaked admissions (target 0)", self.leaked_admissions),
            ("/health checks, worst", f"{self.health_checks}, {self.worst_health_ms:.0f} ms"),
            ("wall time", f"{self.seconds:.1f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class Prober(threading.Thread):
    """GET /health about every 20 ms; keeps (start time, latency, status)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="probe-health", daemon=True)
        self.url, self.samples, self.halt = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.halt.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get(self.url + "/health").status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((t0, time.perf_counter() - t0, status))
                self.halt.wait(0.02)


class GoodClient(threading.Thread):
    """Streams short chats back to back until halted; counts those that did not finish."""

    def __init__(self, url: str, i: int) -> None:
        super().__init__(name=f"probe-good-{i}", daemon=True)
        self.url, self.i, self.halt = url, i, threading.Event()
        self.done = self.lost = self.server_errors = 0
        self.started = threading.Event()

    def run(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"good client {self.i}"}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=120) as client:
            while not self.halt.is_set():
                status, last = 0, ""
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        status = r.status_code
                        for line in r.iter_lines():
                            self.started.set()
                            last = line or last
                except httpx.HTTPError:
                    pass
                self.server_errors += status >= 500
                if status == 200 and last == "data: [DONE]":
                    self.done += 1
                else:
                    self.lost += 1


def probe(streams: int = 4, rounds: int = 1, stall_ms: float = 100.0) -> ProbeReport:
    """Run the probe on a fresh server (see the module docstring)."""
    report = ProbeReport()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(make_tiny_model(Path(tmp) / "tiny", "llama", seed=7)), **LLM_KWARGS)
        app = case_app(llm)
        with run_in_thread(app, port=_free_port()) as server:
            t0 = time.perf_counter()
            prober, good = Prober(server.url), [GoodClient(server.url, i) for i in range(streams)]
            prober.start()
            for g in good:
                g.start()
            for g in good:
                g.started.wait(60)
            spans: list[tuple[float, float, str]] = []  # when each case was in flight
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for _ in range(rounds):
                    for case in CASES:
                        report.cases += 1
                        started = time.perf_counter()
                        r = send(client, case)
                        spans.append((started, time.perf_counter(), case.name))
                        found = problems(case, r)
                        report.clear_4xx += not found
                        report.unintended_5xx += r.status_code >= 500
                        if found:
                            report.failures.append(f"not a clear 4xx: {case.name}: {found}")
            for g in good:
                g.halt.set()
            for g in good:
                g.join(120)
            prober.halt.set()
            prober.join(60)
            _wait_idle(llm, app.state.serving)
            report.seconds = time.perf_counter() - t0
            bm = llm.engine.block_manager
            report.leaked_blocks = bm.num_blocks - bm.num_free_blocks
            report.leaked_admissions = app.state.serving.in_flight
    latencies = [latency for _, latency, _ in prober.samples]
    report.health_checks = len(latencies)
    report.worst_health_ms = 1000 * max(latencies, default=0.0)
    for start, latency, _ in prober.samples:
        if latency * 1000 > stall_ms:
            report.stalls += 1
            during = [n for a, b, n in spans if a <= start + latency and b >= start] or ["-"]
            report.failures.append(f"/health took {latency * 1000:.0f} ms during {during}")
    report.unintended_5xx += sum(status != 200 for _, _, status in prober.samples)
    report.unintended_5xx += sum(g.server_errors for g in good)
    report.lost = sum(g.lost for g in good)
    report.good_streams = sum(g.done + g.lost for g in good)
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_idle(llm: LLM, serving: ServingEngine, timeout: float = 60) -> None:
    """Until the engine has no request and the server no admission (a response releases its
    admission just after its last byte, so a client can be done a moment earlier)."""
    deadline = time.monotonic() + timeout
    while llm.engine.has_unfinished_requests() or serving.in_flight:
        if time.monotonic() > deadline:
            return  # what is left is reported as leaked
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="good streaming clients (4)")
    parser.add_argument("--rounds", type=int, default=1, help="times to send every case (1)")
    parser.add_argument("--stall-ms", type=float, default=100.0, help="a stall, in ms (100)")
    args = parser.parse_args(argv)
    report = probe(args.streams, args.rounds, args.stall_ms)
    print(report.table())
    for failure in report.failures:
        print(f"  {failure}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
