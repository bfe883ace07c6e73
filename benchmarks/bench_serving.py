"""Serving under load: `minillm bench` against `minillm serve`, at concurrency 1, 4 and 16.

    python benchmarks/bench_serving.py [--quick] [--threads 1] [--backend auto] [--model smollm2]
                                       [--max-tokens 128] [--prompt-len 32]

The server runs in its own process (`python -m minillm.cli serve`), as a user would run it,
and the load generator (minillm/bench.py) streams from it over HTTP. Every answer is exactly
--max-tokens long (ignore_eos), so the runs do the same work: 128 tokens by default, the output
length of vLLM's serving benchmark on random prompts. (With 32-token answers the prompts' prefill
was about a third of the c=16 run, so the figure said more about prefill than about batching.)
Reported per concurrency: aggregate output tokens/s, requests/s, TTFT P50/P99, TPOT P50 and
E2E P99. The point to see:
continuous batching lets 16 clients share each decode step, so aggregate throughput at c=16
should be several times that at c=1 (target >= 4x) while each client's TPOT grows far less.

When llama-cpp-python is installed (an optional peer: `pip install llama-cpp-python[server]`),
its OpenAI-compatible server gets the same `minillm bench` runs on the same GGUF file, side by
side. The full run writes the "serving" section of BENCHMARKS.md; --quick only prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402

from minillm.bench import BenchConfig, BenchReport, bench  # noqa: E402
from minillm.hub import resolve  # noqa: E402

CONCURRENCIES = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout} s")


def start_minillm(model: str, threads: int, backend: str, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "minillm.cli",
        "serve",
        model,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--backend",
        backend,
        "--log-level",
        "warning",
        "--served-model-name",
        "bench-model",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def start_llama_cpp(gguf: Path, threads: int, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--model_alias",
        "bench-model",
        "--n_ctx",
        "2048",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_series(url: str, args: argparse.Namespace) -> list[BenchReport]:
    """One warm-up request, then one bench run per concurrency."""
    warm = BenchConfig(
        base_url=url,
        model="bench-model",
        num_requests=1,
        max_tokens=4,
        prompt_len=args.prompt_len,
        ignore_eos=True,
    )
    bench(warm)
    reports = []
    for c in args.concurrency:
        cfg = BenchConfig(
            base_url=url,
            model="bench-model",
            concurrency=c,
            num_requests=max(args.min_requests, args.requests_per_client * c),
            max_tokens=args.max_tokens,
            prompt_len=args.prompt_len,
            ignore_eos=True,
            seed=c,
        )
        report = bench(cfg)
        s = report.summary()
        print(
            f"  c={c:<3} {s['completed']}/{cfg.num_requests} ok  "
            f"{s['output_throughput']:7.2f} tok/s  TTFT p99 {s['ttft_s']['p99']:.2f} s",
            flush=True,
        )
        if s["failed"]:
            raise RuntimeError(f"{s['failed']} requests failed at c={c}: {s['errors']}")
        reports.append(report)
    return reports


def serve_and_bench(
    name: str, proc: subprocess.Popen, url: str, args: argparse.Namespace
) -> list[BenchReport]:
    print(f"{name}: waiting for {url}", flush=True)
    try:
        wait_ready(url, proc)
        return run_series(url, args)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(results: dict[str, list[BenchReport]]) -> str:
    rows = []
    for server, reports in results.items():
        base = reports[0].summary()["output_throughput"]
        for r in reports:
            s = r.summary()
            rows.append(
                [
                    server,
                    s["concurrency"],
                    s["completed"],
                    f"{s['output_throughput'] / max(s['request_throughput'], 1e-9):.1f}",
                    f"{s['output_throughput']:.2f}",
                    f"{s['output_throughput'] / base:.2f}x",
                    f"{s['request_throughput']:.3f}",
                    f"{s['ttft_s']['p50']:.2f}",
                    f"{s['ttft_s']['p99']:.2f}",
                    f"{s['tpot_s']['p50'] * 1000:.0f}",
                    f"{s['e2e_s']['p99']:.2f}",
                ]
            )
    header = [
        "server",
        "concurrency",
        "requests",
        "tokens/request",
        "output tok/s",
        "vs c=1",
        "req/s",
        "TTFT P50 (s)",
        "TTFT P99 (s)",
        "TPOT P50 (ms)",
        "E2E P99 (s)",
    ]
    return _report.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (default 1: the machine is shared)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    p.add_argument("--quick", action="store_true", help="tiny run, print only")
    p.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.requests_per_client, args.min_requests = 8, 1, 1
        args.concurrency = [1, 4]
    gguf = resolve(args.model).path

    results: dict[str, list[BenchReport]] = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results["minillm"] = serve_and_bench(
        "minillm", start_minillm(args.model, args.threads, args.backend, port), url, args
    )
    peer_note = "llama-cpp-python is not installed here, so no peer ran"
    if importlib.util.find_spec("llama_cpp") is not None and gguf.suffix == ".gguf":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            results["llama-cpp-python"] = serve_and_bench(
                "llama-cpp-python", start_llama_cpp(gguf, args.threads, port), url, args
            )
            peer_note = "llama-cpp-python's server ran the same runs on the same GGUF file"
        except (RuntimeError, TimeoutError) as e:
            peer_note = f"llama-cpp-python is installed but its server failed: {e}"

    ours = results["minillm"]
    speedup = ours[-1].summary()["output_throughput"] / ours[0].summary()["output_throughput"]
    c_hi, c_lo = ours[-1].config.concurrency, ours[0].config.concurrency
    verdict = "meets" if speedup >= 4 else "misses"
    command = "python benchmarks/bench_serving.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    md = "\n".join(
        [
            "## Serving: throughput and latency under concurrent load",
            "",
            _report.run_header(
                backend=args.backend,
                model=f"{args.model} ({gguf.name})",
                threads=args.threads,
                command=command.strip(),
            ),
            f"- workload: synthetic prompts of {args.prompt_len} words, answers of exactly "
            f"{args.max_tokens} tokens (ignore_eos), greedy; closed loop, "
            f"{args.requests_per_client} requests per client (at least {args.min_requests}); "
            "the server runs in its own process, `minillm bench` streams from it over HTTP",
            f"- peer: {peer_note}",
            "",
            table(results),
            "",
            f"Aggregate output throughput at c={c_hi} is **{speedup:.1f}x** that at c={c_lo} "
            f"(target >= 4x: {verdict}). At c=1 each decode step carries one sequence; at "
            f"c={c_hi} the same weights are read once per step for {c_hi} sequences, so throughput "
            "grows while each client's TPOT grows much less than c-fold. TTFT P99 grows with "
            "concurrency because new prompts wait for, and then share, steps with running ones. "
            "On a CPU a decode step's cost grows with the sequences in it (the `cpu` backend is "
            "compute-bound beyond a few), so the gain from batching is smaller than on a GPU.",
            "",
            f"tokens/request below {args.max_tokens} means the server ended answers early (it "
            "did not honour `ignore_eos`/`max_tokens`, or cut streams): its tok/s then counts "
            "less work and is not comparable.",
        ]
    )
    print("\n" + md)
    if not args.quick or args.write:
        print(f"wrote {_report.write_section('serving', md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
