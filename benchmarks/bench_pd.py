"""Prefill/decode disaggregation: do running streams keep their pace while long prompts arrive?

    python benchmarks/bench_pd.py [--model smollm2] [--backend auto] [--streams 4]
                                  [--long-prompts 4] [--long-words 700] [--stream-tokens 96]

A few streams decode steadily (short prompts, `--stream-tokens` each, ignore_eos); once they
run, long prompts arrive one after another. On one colocated server each long prompt's
prefill joins the decode steps of the running streams (chunked prefill puts up to
max_num_batched_tokens prompt tokens into a step), so those streams stall: their time per
output token (TPOT, here each gap between two streamed tokens) has a long tail. On a PD pair
the prompts are computed on the prefill server; the decode server only receives their K/V and
writes it into its cache, so its streams should keep a short tail.

Setups, every server its own process (`python -m minillm.cli serve`) with `--threads`:
colocated with 1 thread, colocated with 2 threads (as many cores as the pair uses), and the
pair (prefill 1 thread + decode 1 thread). Also reported: the long prompts' TTFT, and the K/V
bytes per request from the decode server's /metrics against 2 x layers x prompt tokens x KV
heads x head dim x 4 (float32). Prints a markdown table; writes nothing.

On a 2-core machine shared with other work, the numbers are noisy; the ratio of the tails
within one run is the point, not their absolute size.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402

from minillm.bench import BenchConfig, RequestResult, make_prompt, one_request, percentile  # noqa: E402
from minillm.hub import resolve  # noqa: E402
from minillm.parallel.pd_transfer import KVLayout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, backend: str, threads: int, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "minillm.cli", "serve", model, "--port", port]
        args += ["--backend", backend, "--threads", str(threads), "--log-level", "warning"]
        env_threads = {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
        import os

        env = {**os.environ, **env_threads}
        env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
        self.proc = subprocess.Popen([*args, *extra], env=env, stdout=subprocess.DEVNULL)

    def wait(self, timeout: float = 600) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(v) for v in found)


@dataclass
class Run:
    name: str
    streams: list[RequestResult] = field(default_factory=list)
    longs: list[RequestResult] = field(default_factory=list)
    kv_bytes: float = 0.0
    kv_seconds: float = 0.0


async def workload(url: str, model: str, args: argparse.Namespace) -> tuple[list, list]:
    rng = random.Random(0)
    base = dict(base_url=url, model=model, ignore_eos=True, temperature=0.0, timeout=1200)
    stream_cfg = BenchConfig(**base, max_tokens=args.stream_tokens)
    long_cfg = BenchConfig(**base, max_tokens=4)
    async with httpx.AsyncClient(base_url=url, timeout=1200) as client:
        streams = [
            asyncio.ensure_future(one_request(client, stream_cfg, make_prompt(24, rng)))
            for _ in range(args.streams)
        ]
        await asyncio.sleep(args.head_start)  # the streams are decoding now
        longs = []
        for _ in range(args.long_prompts):
            prompt = make_prompt(args.long_words, rng)  # each different: no prefix hits
            longs.append(asyncio.ensure_future(one_request(client, long_cfg, prompt)))
            await asyncio.sleep(args.long_every)
        return list(await asyncio.gather(*streams)), list(await asyncio.gather(*longs))


def measure(name: str, url: str, model: str, args: argparse.Namespace, decode: Server | None):
    warm = BenchConfig(base_url=url, model=model, max_tokens=4, ignore_eos=True)
    asyncio.run(one_request(httpx.AsyncClient(base_url=url, timeout=600), warm, "warm up"))
    names = ("minillm:kv_transfer_bytes_total", "minillm:kv_transfer_seconds_sum")
    before = [decode.metric(n) for n in names] if decode else [0.0, 0.0]
    streams, longs = asyncio.run(workload(url, model, args))
    run = Run(name, streams, longs)
    if decode:
        run.kv_bytes, run.kv_seconds = (
            decode.metric(n) - b for n, b in zip(names, before, strict=True)
        )
    for r in streams + longs:
        if not r.ok:
            raise RuntimeError(f"{name}: a request failed: {r.error}")
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=96)
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-words", type=int, default=700)
    ap.add_argument("--long-every", type=float, default=1.0, help="seconds between long prompts")
    ap.add_argument("--head-start", type=float, default=2.0, help="streams run alone this long")
    args = ap.parse_args()
    path = str(resolve(args.model).path)
    runs: list[Run] = []
    layout = None
    for name, threads in (("colocated, 1 thread", 1), ("colocated, 2 threads", 2)):
        s = Server(path, args.backend, threads).wait()
        try:
            model = httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"]
            runs.append(measure(name, s.url, model, args, None))
        finally:
            s.stop()
    prefill = Server(path, args.backend, 1, "--disaggregation-mode", "prefill")
    decode = Server(
        path, args.backend, 1, "--disaggregation-mode", "decode", "--prefill-url", prefill.url
    )
    try:
        prefill.wait(), decode.wait()
        info = httpx.get(
            f"{prefill.url}/internal/pd/info", headers={"X-Minillm-PD": "decode"}
        ).json()
        layout = KVLayout(info["num_layers"], info["num_kv_heads"], info["head_dim"])
        model = httpx.get(f"{decode.url}/v1/models").json()["data"][0]["id"]
        runs.append(measure("PD pair, 1 + 1 threads", decode.url, model, args, decode))
    finally:
        decode.stop()
        prefill.stop()

    rows = []
    for r in runs:
        gaps = [g for s in r.streams for g in s.itl]
        ttft = [x.ttft for x in r.longs if x.ttft is not None]
        rows.append(
            [
                r.name,
                f"{1000 * percentile(gaps, 50):.0f}",
                f"{1000 * percentile(gaps, 99):.0f}",
                f"{1000 * max(gaps):.0f}",
                f"{percentile(ttft, 50):.2f}",
            ]
        )
    print(
        _report.run_header(
            backend=args.backend,
            model=args.model,
            threads=1,
            command="python benchmarks/bench_pd.py " + " ".join(sys.argv[1:]),
        )
    )
    print(
        f"{args.streams} streams of {args.stream_tokens} tokens; {args.long_prompts} long "
        f"prompts of {args.long_words} words arriving {args.long_every} s apart.\n"
    )
    header = [
        "setup",
        "stream TPOT P50 (ms)",
        "TPOT P99 (ms)",
        "worst gap (ms)",
        "long TTFT P50 (s)",
    ]
    print(_report.markdown_table(header, rows))
    pd = runs[-1]
    assert layout is not None
    prompt_tokens = [x.prompt_tokens for x in pd.streams + pd.longs]
    formula = sum(layout.bytes_for(n) for n in prompt_tokens)
    print()
    kv_rows = [
        [
            f"{x.prompt_tokens}",
            f"{layout.bytes_for(x.prompt_tokens) / 2**20:.2f}",
        ]
        for x in pd.longs
    ]
    print(_report.markdown_table(["long prompt tokens", "K/V per request (MiB, formula)"], kv_rows))
    print(
        f"\nK/V bytes received by the decode server in the PD run: {pd.kv_bytes:.0f}; formula "
        f"2 x {layout.num_layers} layers x tokens x {layout.num_kv_heads} KV heads x "
        f"{layout.head_dim} x 4 B (float32) summed over its {len(prompt_tokens)} requests: "
        f"{formula}; transfer time in total {pd.kv_seconds:.3f} s "
        f"({pd.kv_bytes / max(pd.kv_seconds, 1e-9) / 2**20:.0f} MiB/s over loopback HTTP)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
