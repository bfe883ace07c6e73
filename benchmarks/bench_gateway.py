"""`minillm gateway` in front of two `minillm serve` upstreams: what routing buys, what it costs.

    python benchmarks/bench_gateway.py [--model smollm2] [--backend auto] [--threads 1]
                                       [--prompts 8] [--questions 4] [--write]

1. Prefix affinity vs round robin, on a shared-system-prompt workload: `--prompts` system
   prompts (a few hundred characters each) with `--questions` user questions each, sent in a
   shuffled order by 4 concurrent clients. Reported: the upstreams' own prefix-cache hit rate
   (vllm:prefix_cache_hits / queries, in tokens, from their /metrics) and client TTFT. Round
   robin sends a system prompt to both upstreams, so each prefills it once; prefix affinity
   keeps it on one.
2. Added latency: TTFT of the same request straight to an upstream and through the gateway,
   interleaved, on loopback (the difference of the medians is the gateway's cost).
3. Failover under load: 32 concurrent streams over both upstreams; one upstream is SIGKILLed
   as soon as it streams. Every request must complete or end with a clear error event; a
   request counts as lost otherwise.

The upstreams and the gateway are separate processes, as a user runs them. Prints markdown;
--write also puts it in BENCHMARKS.md's "gateway" section.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402

TOPICS = ["a travel agency", "a bank's help desk", "a cooking school", "a chess club",
          "a bicycle shop", "a public library", "a weather service", "a music teacher",
          "a hospital front desk", "a railway station", "a museum guide", "a plant nursery"]  # fmt: skip
QUESTIONS = ["What do you do?", "When are you open?", "How much does it cost?",
             "Can you help me today?", "Where are you?", "Who should I ask?"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{what} did not come up in 600 s")


def serve(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "minillm.cli", "serve", args.model, "--port", str(port),
           "--backend", args.backend, "--threads", str(args.threads), "--served-model-name",
           "m", "--log-level", "warning"]  # fmt: skip
    return start(cmd, url, "minillm serve"), url


def gateway(upstreams: list[str], strategy: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "minillm.cli", "gateway", "--port", str(port), "--strategy",
           strategy, "--log-level", "warning"]  # fmt: skip
    for u in upstreams:
        cmd += ["--upstream", u]
    return start(cmd, url, "minillm gateway"), url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
            for s in fam.samples:
                if s.name == "vllm:prefix_cache_hits_total":
                    hits += s.value
                elif s.name == "vllm:prefix_cache_queries_total":
                    queries += s.value
    return hits, queries


async def stream_ttft(client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int) -> float:
    return (await stream_ttft_from(client, messages, max_tokens))[0]


async def stream_ttft_from(
    client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int
) -> tuple[float, str]:
    """(TTFT, the upstream that answered, from the gateway's x-minillm-upstream header)."""
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=max_tokens, stream=True
    )
    upstream = stream.response.headers.get("x-minillm-upstream", "")
    ttft = None
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), upstream


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def p(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


# ---------------------------------------------------------------------------- 1. affinity
async def run_workload(
    client: openai.AsyncOpenAI, queue: list[tuple[str, str]], concurrency: int
) -> list[float]:
    """`concurrency` clients take (system, question) pairs off the queue; their TTFTs, and for
    each system prompt the set of upstreams that answered it."""
    ttfts: list[float] = []
    spread: dict[str, set[str]] = {}

    async def worker() -> None:
        while queue:
            system, question = queue.pop()
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            ttft, upstream = await stream_ttft_from(client, msgs, 8)
            ttfts.append(ttft)
            spread.setdefault(system, set()).add(upstream)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, spread


def affinity_vs_round_robin(ups: list[str], args: argparse.Namespace) -> str:
    rows = []
    for n, strategy in enumerate(("round-robin", "prefix-affinity")):
        rng = random.Random(n)
        systems = [
            f"[{strategy} run] You are the assistant of {topic}. Answer in one short, polite "
            f"sentence. Never invent facts; say you do not know instead. Greet nobody. "
            f"Keep the customer's data private. Mention {topic} by name when it helps. " * 2
            for topic in TOPICS[: args.prompts]
        ]
        work = [(s, q) for s in systems for q in QUESTIONS[: args.questions]]
        rng.shuffle(work)
        gw, url = gateway(ups, strategy)
        try:
            hits0, queries0 = cache_counters(ups)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            t0 = time.perf_counter()
            ttfts, spread = asyncio.run(run_workload(client, list(work), 4))
            wall = time.perf_counter() - t0
            hits, queries = cache_counters(ups)
        finally:
            stop(gw)
        rate = (hits - hits0) / max(queries - queries0, 1)
        per_prompt = statistics.mean(len(u) for u in spread.values())
        rows.append([strategy, len(work), f"{rate:.1%}", f"{per_prompt:.2f}",
                     ms(statistics.median(ttfts)), ms(p(ttfts, 90)), f"{wall:.1f}"])  # fmt: skip
    head = ["strategy", "requests", "prefix-cache hit rate (tokens)",
            "upstreams per system prompt", "TTFT P50 ms", "TTFT P90 ms", "wall s"]  # fmt: skip
    return _report.markdown_table(head, rows)


# ---------------------------------------------------------------------------- 2. added latency
def added_latency(upstream: str, n: int) -> str:
    gw, url = gateway([upstream], "round-robin")
    try:
        direct = openai.AsyncOpenAI(base_url=upstream + "/v1", api_key="x", max_retries=0)
        via = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Say hi."}]
        d, g = [], []

        async def run() -> None:
            for client in (direct, via):  # warm both connections and the prefix cache
                await stream_ttft(client, msgs, 2)
            for _ in range(n):
                d.append(await stream_ttft(direct, msgs, 2))
                g.append(await stream_ttft(via, msgs, 2))

        asyncio.run(run())
    finally:
        stop(gw)
    rows = [["direct to `minillm serve`", n, ms(statistics.median(d)), ms(p(d, 90))],
            ["through `minillm gateway`", n, ms(statistics.median(g)), ms(p(g, 90))],
            ["added by the gateway", "", ms(statistics.median(g) - statistics.median(d)),
             ms(p(g, 90) - p(d, 90))]]  # fmt: skip
    return _report.markdown_table(["path", "requests", "TTFT P50 ms", "TTFT P90 ms"], rows)


# ---------------------------------------------------------------------------- 3. failover
def failover(ups: list[str], victim: subprocess.Popen, streams: int) -> str:
    gw, url = gateway(ups, "round-robin")
    victim_name = ups[1].split("//")[1]
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        streaming = asyncio.Event()

        async def one(i: int) -> tuple[str, str]:
            try:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"Tell story {i}."}],
                    temperature=0, max_tokens=32, stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
            except openai.APIError as e:
                return "error", str(e)
            upstream = stream.response.headers.get("x-minillm-upstream", "")
            reason = None
            try:
                async for chunk in stream:
                    if upstream == victim_name:
                        streaming.set()
                    for c in chunk.choices:
                        reason = c.finish_reason or reason
            except openai.APIError as e:
                return "error", str(e)
            return ("done", upstream) if reason == "length" else ("lost", str(reason))

        async def run() -> list[tuple[str, str]]:
            tasks = [asyncio.create_task(one(i)) for i in range(streams)]
            await asyncio.wait_for(streaming.wait(), 600)
            os.kill(victim.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 600)

        results = asyncio.run(run())
        text = httpx.get(url + "/metrics").text
        retried = sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "minillm_gateway_retries_total"
        )
    finally:
        stop(gw)
    done = sum(r[0] == "done" for r in results)
    errors = sum(r[0] == "error" for r in results)
    lost = streams - done - errors
    head = ["streams", "completed", "clear error (cut mid-stream)", "lost",
            "retried on the other upstream"]  # fmt: skip
    return _report.markdown_table(head, [[streams, done, errors, lost, int(retried)]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per upstream")
    ap.add_argument("--prompts", type=int, default=8, help="distinct system prompts")
    ap.add_argument("--questions", type=int, default=4, help="questions per system prompt")
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="write BENCHMARKS.md's gateway section")
    args = ap.parse_args()
    procs, ups = [], []
    try:
        for _ in range(2):
            proc, url = serve(args)
            procs.append(proc)
            ups.append(url)
        affinity = affinity_vs_round_robin(ups, args)
        print(affinity, flush=True)
        latency = added_latency(ups[0], args.latency_requests)
        print(latency, flush=True)
        fail = failover(ups, procs[1], args.streams)
        print(fail, flush=True)
    finally:
        for proc in procs:
            stop(proc)
    command = "python benchmarks/bench_gateway.py " + " ".join(sys.argv[1:])
    md = (
        "## Gateway: prefix affinity, added latency, failover\n\n"
        + _report.run_header(
            backend=args.backend, model=args.model, threads=args.threads, command=command
        )
        + "- two `minillm serve` upstreams and `minillm gateway`, each its own process, on "
        "loopback\n\n"
        f"### Prefix affinity vs round robin ({args.prompts} system prompts x {args.questions} "
        "questions, 4 concurrent clients, 8 tokens each)\n\n" + affinity + "\n\n"
        "### Added latency (time to first token, the same request interleaved)\n\n"
        + latency
        + "\n\n"
        f"### Failover under load ({args.streams} concurrent streams; one upstream SIGKILLed "
        "as soon as it streams)\n\n" + fail + "\n"
    )
    print()
    print(md)
    if args.write:
        print(f"wrote {_report.write_section('gateway', md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
