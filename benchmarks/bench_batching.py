"""Continuous batching, paged-KV waste and prefix caching, measured side by side in one run.

    python benchmarks/bench_batching.py [--quick] [--threads N] [--backend ref] [--model smollm2]

1. Throughput and latency: one workload of requests with varied prompt and output lengths,
   all arriving at once, served four ways by the same engine code: one request at a time
   (max_num_seqs=1); static batching (B requests handed over together, the next B only when
   all of them are done); continuous batching with the same max_num_seqs=B; and continuous
   batching in the same KV memory that static batching reserves (B contiguous max_model_len
   buffers), where paging lets as many requests run as their actual tokens fit.
2. KV memory waste: at every step of the continuous run, the slots the paged cache has
   allocated but not filled, against what contiguous per-request reservations would waste on
   the very same running set.
3. Prefix caching: time to first token (TTFT) of requests that share a long system prompt,
   with the prefix cache off and with it warm.

The full run writes the "batching" section of BENCHMARKS.md; ``--quick`` (a small workload for
smoke tests) only prints, unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402

from minillm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from minillm.engine.outputs import RequestOutput  # noqa: E402
from minillm.sampling import SamplingParams  # noqa: E402
from minillm.ui.widgets import engine_block_view  # noqa: E402

# Real English prose for prompts, available offline and identical on every machine running
# the same Python: the docstrings of some standard-library modules and their public classes.
_CORPUS_MODULES = (
    "argparse",
    "collections",
    "functools",
    "itertools",
    "json",
    "pathlib",
    "subprocess",
    "threading",
    "logging",
    "datetime",
    "decimal",
    "textwrap",
    "difflib",
    "heapq",
    "unittest",
    "typing",
    "asyncio",
    "re",
)

_TOPICS = (
    "lists",
    "files",
    "threads",
    "dates",
    "numbers",
    "errors",
    "tests",
    "strings",
    "queues",
    "paths",
    "options",
    "decimals",
)


@dataclass(frozen=True)
class BenchConfig:
    num_requests: int = 64
    prompt_len: tuple[int, int] = (64, 192)  # inclusive range, uniform
    # Output lengths are long-tailed, as in chat traffic (most answers short, a few long):
    # log-normal with this median and sigma, clipped to output_len.
    output_len: tuple[int, int] = (8, 320)
    output_median: float = 64.0
    output_sigma: float = 0.8
    batch_size: int = 16  # static batch size B, and max_num_seqs of the first continuous run
    block_size: int = 16
    max_model_len: int = 512  # what the server is configured to serve: 192 + 320
    notes_max_len: int = 2048  # the max_seq_len of the course notes' example
    system_prompt_tokens: int = 512
    num_questions: int = 8
    question_max_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.prompt_len[1] + self.output_len[1] > self.max_model_len:
            raise ValueError("the longest prompt plus the longest output exceed max_model_len")
        if self.num_requests < 1 or self.batch_size < 1 or self.num_questions < 1:
            raise ValueError("num_requests, batch_size and num_questions must be >= 1")
        if self.output_median <= 0 or self.output_sigma < 0:
            raise ValueError("output_median must be > 0 and output_sigma >= 0")


FULL = BenchConfig()
QUICK = BenchConfig(
    num_requests=12,
    prompt_len=(8, 48),
    output_len=(4, 16),
    output_median=8.0,
    batch_size=4,
    max_model_len=128,
    notes_max_len=2048,
    system_prompt_tokens=128,
    num_questions=3,
    question_max_tokens=4,
)


# ================================================================================ workload
@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)


def corpus_text() -> str:
    import importlib

    parts = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and inspect.isclass(obj) and obj.__module__ == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def corpus_token_ids(tokenizer: Any, min_tokens: int) -> list[int]:
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    if len(ids) < min_tokens:
        raise ValueError(f"the text corpus has {len(ids)} tokens, fewer than {min_tokens}")
    return ids


def make_workload(corpus: list[int], cfg: BenchConfig) -> list[Request]:
    """Prompts are windows of real text at random offsets, of uniform length; output lengths
    are log-normal (long-tailed), clipped to their range."""
    rng = random.Random(cfg.seed)
    lo, hi = cfg.output_len
    out = []
    for i in range(cfg.num_requests):
        n = rng.randint(*cfg.prompt_len)
        start = rng.randrange(0, len(corpus) - n)
        draw = rng.lognormvariate(math.log(cfg.output_median), cfg.output_sigma)
        max_tokens = min(hi, max(lo, round(draw)))
        out.append(Request(f"req-{i:03d}", corpus[start : start + n], max_tokens))
    return out


# ================================================================================ one mode
@dataclass(frozen=True)
class WasteSample:
    """KV slots at one step, over the sequences running after it."""

    used: int  # slots holding a token's K/V (physical slots, for the paged cache)
    used_per_request: int  # the same summed per request (what contiguous buffers would hold)
    paged_allocated: int  # slots in the blocks the running sequences hold
    reserved_exact: int  # contiguous, each request reserving prompt + max_tokens
    reserved_max_len: int  # contiguous, each request reserving max_model_len
    reserved_notes: int  # contiguous, each request reserving the notes' max_seq_len
    running: int = 0  # requests running after the step

    @property
    def paged_waste(self) -> float:
        return 1 - self.used / self.paged_allocated

    def contiguous_waste(self, reserved: int) -> float:
        return 1 - self.used_per_request / reserved


@dataclass
class ModeResult:
    name: str
    max_num_seqs: int
    wall_s: float
    outputs: dict[str, RequestOutput]
    steps: int
    preemptions: int
    waste: list[WasteSample] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(o.outputs[0].token_ids) for o in self.outputs.values())

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def mean_ttft(self) -> float:
        return statistics.fmean(o.metrics.ttft for o in self.outputs.values())

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(
            o.metrics.finished_time - o.metrics.arrival_time for o in self.outputs.values()
        )


def make_engine(
    loaded: Any,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    enable_prefix_caching: bool = True,
    num_kv_blocks: int | None = None,
) -> LLMEngine:
    """By default a KV cache that holds max_num_seqs requests of max_model_len: no preemption."""
    blocks = num_kv_blocks or max_num_seqs * -(-max_model_len // block_size) + 1
    return LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            block_size=block_size,
            num_kv_blocks=blocks,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        ),
    )


def measure_waste(engine: LLMEngine, workload: dict[str, Request], cfg: BenchConfig) -> WasteSample:
    view = engine_block_view(engine)
    running = engine.scheduler.running
    return WasteSample(
        used=view.used_slots,
        used_per_request=sum(s.num_computed_tokens for s in running),
        paged_allocated=view.allocated_slots,
        reserved_exact=sum(
            s.num_prompt_tokens + workload[s.request_id].max_tokens for s in running
        ),
        reserved_max_len=len(running) * cfg.max_model_len,
        reserved_notes=len(running) * cfg.notes_max_len,
        running=len(running),
    )


def run_mode(
    loaded: Any,
    workload: list[Request],
    cfg: BenchConfig,
    name: str,
    max_num_seqs: int,
    group_size: int | None = None,
    probe_waste: bool = False,
    num_kv_blocks: int | None = None,
) -> ModeResult:
    """Serve the whole workload, all arriving at t0; groups of `group_size` = static batching."""
    engine = make_engine(
        loaded,
        block_size=cfg.block_size,
        max_model_len=cfg.max_model_len,
        max_num_seqs=max_num_seqs,
        num_kv_blocks=num_kv_blocks,
    )
    by_id = {r.request_id: r for r in workload}
    groups = (
        [workload]
        if group_size is None
        else [workload[i : i + group_size] for i in range(0, len(workload), group_size)]
    )
    outputs: dict[str, RequestOutput] = {}
    waste: list[WasteSample] = []
    steps = 0
    t0 = time.perf_counter()
    for group in groups:
        for r in group:
            engine.add_request(r.request_id, r.prompt_ids, r.params(), arrival_time=t0)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            steps += 1
            if probe_waste and engine.scheduler.running:
                waste.append(measure_waste(engine, by_id, cfg))
    wall = time.perf_counter() - t0
    return ModeResult(
        name, max_num_seqs, wall, outputs, steps, engine.scheduler.num_preemptions, waste
    )


def same_memory_blocks(cfg: BenchConfig) -> int:
    """The KV blocks that hold what static batching reserves: B buffers of max_model_len."""
    return cfg.batch_size * -(-cfg.max_model_len // cfg.block_size)


def run_batching(loaded: Any, workload: list[Request], cfg: BenchConfig) -> list[ModeResult]:
    """one at a time, static (B), continuous (max_num_seqs=B), continuous (same KV memory)."""
    b = cfg.batch_size
    return [
        run_mode(loaded, workload, cfg, "one request at a time", 1),
        run_mode(loaded, workload, cfg, f"static batching (B={b})", b, group_size=b),
        run_mode(loaded, workload, cfg, f"continuous batching (max_num_seqs={b})", b),
        run_mode(
            loaded,
            workload,
            cfg,
            "continuous batching, same KV memory as static",
            len(workload),
            probe_waste=True,
            num_kv_blocks=same_memory_blocks(cfg),
        ),
    ]


def waste_summary(samples: list[WasteSample]) -> dict[str, float]:
    """Each policy's waste averaged over the sampled steps."""
    if not samples:
        raise ValueError("no waste samples: run the continuous mode with probe_waste=True")
    return {
        "paged": statistics.fmean(s.paged_waste for s in samples),
        "exact": statistics.fmean(s.contiguous_waste(s.reserved_exact) for s in samples),
        "max_len": statistics.fmean(s.contiguous_waste(s.reserved_max_len) for s in samples),
        "notes": statistics.fmean(s.contiguous_waste(s.reserved_notes) for s in samples),
    }


# ================================================================================ prefix cache
@dataclass
class PrefixResult:
    shared_prefix_tokens: int
    prompt_tokens: list[int]
    ttft_off: list[float]  # prefix caching disabled, each question
    ttft_prime: float  # caching on, first request (cold cache: a miss)
    ttft_hit: list[float]  # caching on, each question after the prime
    cached_tokens: list[int]  # per hit request, prompt tokens served from the cache
    queries: int  # block manager counters (tokens) after the run
    hits: int
    same_outputs: int

    @property
    def speedup(self) -> float:
        return statistics.fmean(self.ttft_off) / statistics.fmean(self.ttft_hit)


def shared_prefix_prompts(loaded: Any, corpus: list[int], cfg: BenchConfig) -> list[list[int]]:
    """Chat prompts: one long system prompt of real text, then a short distinct question each.

    Question 0 primes the cache; questions 1..num_questions are the measured ones."""
    tok = loaded.tokenizer
    system = tok.decode(corpus[: cfg.system_prompt_tokens]).strip()
    prompts = []
    for i in range(cfg.num_questions + 1):
        question = (
            f"Question {i + 1}: in one sentence, what does the text above say "
            f"about {_TOPICS[i % len(_TOPICS)]}?"
        )
        text = loaded.chat_template.render(
            [{"role": "system", "content": system}, {"role": "user", "content": question}],
            add_generation_prompt=True,
        )
        prompts.append(tok.encode(text))
    return prompts


def _serve_one(
    engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams
) -> RequestOutput:
    engine.add_request(rid, prompt, params)
    while True:
        for out in engine.step():
            if out.finished:
                return out


def run_prefix_cache(loaded: Any, corpus: list[int], cfg: BenchConfig) -> PrefixResult:
    prompts = shared_prefix_prompts(loaded, corpus, cfg)
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    params = SamplingParams(temperature=0.0, max_tokens=cfg.question_max_tokens, ignore_eos=True)
    sizes = dict(
        block_size=cfg.block_size,
        max_num_seqs=1,
        max_model_len=max(len(p) for p in prompts) + cfg.question_max_tokens,
    )
    off = make_engine(loaded, **sizes, enable_prefix_caching=False)
    outs_off = [_serve_one(off, f"q{i}", p, params) for i, p in enumerate(prompts[1:], 1)]
    on = make_engine(loaded, **sizes, enable_prefix_caching=True)
    prime = _serve_one(on, "q0", prompts[0], params)
    outs_on = [_serve_one(on, f"q{i}", p, params) for i, p in enumerate(prompts[1:], 1)]
    bm = on.block_manager
    return PrefixResult(
        shared_prefix_tokens=shared,
        prompt_tokens=[len(p) for p in prompts],
        ttft_off=[o.metrics.ttft for o in outs_off],
        ttft_prime=prime.metrics.ttft,
        ttft_hit=[o.metrics.ttft for o in outs_on],
        cached_tokens=[o.metrics.num_cached_tokens for o in outs_on],
        queries=bm.prefix_cache_queries,
        hits=bm.prefix_cache_hits,
        same_outputs=sum(
            a.outputs[0].token_ids == b.outputs[0].token_ids
            for a, b in zip(outs_off, outs_on, strict=True)
        ),
    )


# ================================================================================ report
def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def format_batching(modes: list[ModeResult], workload: list[Request], cfg: BenchConfig) -> str:
    base = modes[0].tokens_per_s
    rows = [
        [
            m.name,
            m.max_num_seqs,
            m.output_tokens,
            _f(m.wall_s, 1),
            _f(m.tokens_per_s, 1),
            _f(m.tokens_per_s / base) + "x",
            _f(m.mean_ttft),
            _f(m.mean_latency),
            m.steps,
            m.preemptions,
        ]
        for m in modes
    ]
    table = _report.markdown_table(
        [
            "mode",
            "max_num_seqs",
            "output tokens",
            "wall s",
            "output tok/s",
            "vs one-at-a-time",
            "mean TTFT s",
            "mean latency s",
            "engine steps",
            "preemptions",
        ],
        rows,
    )
    one, static, cont, mem = modes
    same = sum(
        len({tuple(m.outputs[r.request_id].outputs[0].token_ids) for m in modes}) == 1
        for r in workload
    )
    prompt_tokens = sum(len(r.prompt_ids) for r in workload)
    outs = sorted(r.max_tokens for r in workload)
    peak = max(s.running for s in mem.waste) if mem.waste else 0
    return (
        f"{len(workload)} requests arriving together: prompts of {cfg.prompt_len[0]}–"
        f"{cfg.prompt_len[1]} tokens, uniform (windows of English text from Python "
        f"standard-library docstrings, {prompt_tokens} prompt tokens in all); outputs "
        f"long-tailed as in chat traffic: log-normal, median {cfg.output_median:g}, sigma "
        f"{cfg.output_sigma:g}, clipped to {cfg.output_len[0]}–{cfg.output_len[1]} (drawn: "
        f"median {statistics.median(outs):g}, max {outs[-1]}, {sum(outs)} in all; greedy, "
        f"`ignore_eos`), seed {cfg.seed}. TTFT and latency count from the common arrival "
        "time, so they include queueing.\n\n"
        f"{table}\n\n"
        f"- continuous batching in the same KV memory / static: "
        f"**{mem.tokens_per_s / static.tokens_per_s:.2f}x**; / one-at-a-time: "
        f"**{mem.tokens_per_s / one.tokens_per_s:.2f}x**\n"
        f"- at the same max_num_seqs={cfg.batch_size}: continuous / static "
        f"{cont.tokens_per_s / static.tokens_per_s:.2f}x, / one-at-a-time "
        f"{cont.tokens_per_s / one.tokens_per_s:.2f}x\n"
        f"- greedy outputs identical in all four modes: {same}/{len(workload)} requests\n"
        f"- static batching reserves {cfg.batch_size} contiguous buffers of max_model_len="
        f"{cfg.max_model_len} ({same_memory_blocks(cfg)} blocks of {cfg.block_size} slots); the "
        "last run gets exactly that many paged blocks and no cap on requests, so it runs as "
        f"many as their actual tokens fit (up to {peak} at once here) and preempts (by "
        "recompute) when they outgrow it. With the same max_num_seqs the two batching modes "
        "differ only in *when* a finished request's place is refilled; on a CPU a step's cost "
        "grows with the rows in it, so refilling early gains less than the step counts suggest."
    )


def format_waste(samples: list[WasteSample], cfg: BenchConfig) -> str:
    w = waste_summary(samples)
    rows = [
        [
            f"paged, block_size={cfg.block_size}",
            "ceil(tokens / block_size) blocks, on demand",
            _f(100 * w["paged"], 1) + "%",
        ],
        [
            "contiguous, exact",
            "prompt + max_tokens slots at admission",
            _f(100 * w["exact"], 1) + "%",
        ],
        [
            f"contiguous, max_model_len={cfg.max_model_len}",
            f"{cfg.max_model_len} slots at admission",
            _f(100 * w["max_len"], 1) + "%",
        ],
        [
            f"contiguous, max_seq_len={cfg.notes_max_len} (the notes' example)",
            f"{cfg.notes_max_len} slots at admission",
            _f(100 * w["notes"], 1) + "%",
        ],
    ]
    table = _report.markdown_table(["KV allocation", "a running request holds", "waste"], rows)
    return (
        "Waste = allocated-but-empty slots / allocated slots, over the requests running after "
        f"each of the {len(samples)} steps of the same-memory continuous run above, averaged over those "
        "steps. A slot is *used* when it holds a computed token's K/V. The contiguous rows are "
        "computed on the same running sets.\n\n"
        f"{table}\n\n"
        "The course notes say contiguous pre-allocation wastes 60–80% and paging is close to "
        "0: the max_model_len rows are that policy (what a server must reserve when it cannot "
        "know the output length); even an oracle that knows every output length (the exact "
        "row) wastes the not-yet-generated tail, while the paged cache only wastes the unfilled "
        "part of each sequence's last block."
    )


def format_prefix(p: PrefixResult, cfg: BenchConfig) -> str:
    rows = [
        ["prefix caching off", len(p.ttft_off), _f(statistics.fmean(p.ttft_off), 3), "0"],
        ["on, cold cache (first request)", 1, _f(p.ttft_prime, 3), "0"],
        [
            "on, warm cache (hit)",
            len(p.ttft_hit),
            _f(statistics.fmean(p.ttft_hit), 3),
            f"{statistics.fmean(p.cached_tokens):.0f}",
        ],
    ]
    table = _report.markdown_table(["run", "requests", "mean TTFT s", "cached prompt tokens"], rows)
    return (
        f"A chat prompt with a system prompt of {cfg.system_prompt_tokens} tokens of text, "
        f"then a short distinct question; prompts of {min(p.prompt_tokens)}–"
        f"{max(p.prompt_tokens)} tokens share their first {p.shared_prefix_tokens}. Requests "
        "are served one at a time, so TTFT is the prefill alone.\n\n"
        f"{table}\n\n"
        f"- TTFT, cache off / cache hit: **{p.speedup:.1f}x**\n"
        f"- block manager counters (tokens): queries {p.queries}, hits {p.hits} "
        f"({p.hits / p.queries:.1%}); only full blocks of {cfg.block_size} hit, and the last "
        "prompt token is always recomputed\n"
        f"- greedy outputs identical with and without the cache: {p.same_outputs}/"
        f"{len(p.ttft_hit)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small workload (smoke test)")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch intra-op threads (default: all cores)",
    )
    ap.add_argument("--backend", default="ref")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write BENCHMARKS.md (default: yes for the full run, no for --quick)",
    )
    ap.add_argument("--output", type=Path, default=_report.BENCHMARKS_MD)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")

    import torch

    from minillm.loader import load_model

    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    loaded = load_model(args.model, args.backend)
    corpus = corpus_token_ids(loaded.tokenizer, max(cfg.prompt_len[1], cfg.system_prompt_tokens))
    workload = make_workload(corpus, cfg)

    t0 = time.perf_counter()
    modes = run_batching(loaded, workload, cfg)
    prefix = run_prefix_cache(loaded, corpus, cfg)
    total = time.perf_counter() - t0

    command = "python benchmarks/bench_batching.py" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads} --backend {args.backend}"
    if args.model != "smollm2":
        command += f" --model {args.model}"
    model = f"{args.model} ({loaded.path.name}, {loaded.config.num_layers} layers)"
    body = (
        "## Continuous batching, paged KV cache and prefix caching\n\n"
        + _report.run_header(
            backend=args.backend, model=model, threads=torch.get_num_threads(), command=command
        )
        + f"- total benchmark time: {total:.0f} s\n\n"
        "### Throughput and latency: one at a time vs static vs continuous batching\n\n"
        + format_batching(modes, workload, cfg)
        + "\n\n### KV-cache memory waste: paged vs contiguous pre-allocation\n\n"
        + format_waste(modes[3].waste, cfg)
        + "\n\n### Prefix caching: a shared system prompt\n\n"
        + format_prefix(prefix, cfg)
        + "\n"
    )
    print(body)
    if args.write if args.write is not None else not args.quick:
        print(f"wrote {_report.write_section('batching', body, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
