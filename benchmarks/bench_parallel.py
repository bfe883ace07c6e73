"""Distributed inference on this machine: traffic against the formulas, where a step's time goes,
and prefill/decode disaggregation's effect on running streams, all in one run.

    python benchmarks/bench_parallel.py [--backend cpu] [--tokens 32] [--skip-pd] [--no-write]

1. Bytes per token each strategy hands to torch.distributed (minillm.parallel.traffic, every
   rank), next to its formula: TP (two all-reduces of d values per layer), PP (d values per
   stage boundary), EP (dispatch + combine of each token's hidden vector to its top-k experts),
   CP (each rank's K/V chunk passed around the ring, per layer), on the bundled SmolLM2 (EP on
   a tiny random Mixtral, since no MoE checkpoint ships).
2. Decode throughput and where a step's time goes: one process against tp=3, pp=2 and pp=3,
   single stream and 8 streams, with each pipeline stage's busy time and the bubble against
   (p-1)/(m+p-1). On a 2-core machine more processes than cores is slower; the table shows it.
3. What the same formulas give on real interconnects (minillm.estimate_parallel, Llama-3-70B).
4. PD: benchmarks/bench_pd.py's run (TPOT tail of running streams while long prompts arrive,
   colocated vs a prefill/decode pair; K/V bytes per request against the formula).

Writes the "parallel" section of BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402

from minillm import LLM, SamplingParams  # noqa: E402
from minillm.estimate import GPUS, KNOWN_MODELS, ModelSpec, weights_bytes  # noqa: E402
from minillm.estimate_parallel import (  # noqa: E402
    LINKS,
    cp_bytes_per_prefill,
    pp_bytes_per_token,
    tp_bytes_per_token,
    tp_messages_per_token,
)
from minillm.hub import resolve  # noqa: E402

PROMPTS = [
    "Explain tensor parallelism in one paragraph.",
    "Write a haiku about pipelines.",
    "What is an all-reduce?",
    "List three uses of a GPU.",
    "Why do experts need a router?",
    "Describe ring attention briefly.",
    "What does a KV cache store?",
    "Name a famous bridge.",
]


def _processed_tokens(outs: list) -> int:
    """Tokens that went through the model: every prompt token and every sampled one but the last."""
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)


def _sum_kind(snapshots: list[dict], prefix: str) -> int:
    return sum(v["bytes"] for snap in snapshots for k, v in snap.items() if k.startswith(prefix))


# ---------------------------------------------------------------------------- 1. traffic
def traffic_rows(backend: str, tokens: int) -> list[list[str]]:
    path = str(resolve("smollm2").path)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    rows = []
    for tp, pp in ((3, 1), (1, 2), (1, 3)):
        with LLM(path, backend=backend, tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
            spec = ModelSpec.from_config(llm.config)
            llm.executor.reset_stats()
            outs = llm.generate(PROMPTS[:2], params)
            snaps = llm.executor.traffic_snapshots()
        n = _processed_tokens(outs)
        if tp > 1:
            payload = snaps[0]["tp_all_reduce"]["bytes"] / n
            formula = 2 * spec.num_layers * spec.hidden_size * 4
            wire = tp_bytes_per_token(spec, tp, act_bytes=4)
            rows.append(
                [f"TP={tp}: all-reduce payload per rank", f"{payload:,.0f}",
                 f"2 x L x d x 4 = {formula:,}", f"{wire:,.0f}"]
            )  # fmt: skip
        else:
            sent = _sum_kind(snaps, "pp_send") / n
            formula = pp_bytes_per_token(spec, pp, act_bytes=4)
            rows.append(
                [f"PP={pp}: activations sent, all stages", f"{sent:,.0f}",
                 f"(p-1) x d x 4 = {formula:,.0f}", f"{formula:,.0f}"]
            )  # fmt: skip
    rows += ep_rows()
    rows += cp_rows(path)
    return rows


def ep_rows() -> list[list[str]]:
    from minillm.parallel.ep_run import expert_parallel_layer
    from minillm.testing import make_tiny_moe_model

    with tempfile.TemporaryDirectory() as tmp:
        moe = make_tiny_moe_model(
            Path(tmp) / "mixtral", "mixtral", 6, 2,
            hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16,
        )  # fmt: skip
        d, k, t = 96, 2, 600
        hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(0))
        rows = []
        for n in (2, 3):
            results = expert_parallel_layer(moe, 0, hidden, n)
            sent = sum(
                r.traffic.get(kind, {}).get("bytes", 0)
                for r in results
                for kind in ("ep_dispatch", "ep_combine")
            )
            formula = 2 * k * d * 4 * (n - 1) / n
            rows.append(
                [f"EP={n} (tiny Mixtral, 6 experts, top-2, one layer)", f"{sent / t:,.1f}",
                 f"2 x k x d x 4 x (N-1)/N = {formula:,.1f}", f"{sent / t:,.1f}"]
            )  # fmt: skip
    return rows


def cp_rows(path: str) -> list[list[str]]:
    from minillm.parallel.cp import context_parallel_prefill

    llm = LLM(path, backend="ref")
    spec = ModelSpec.from_config(llm.config)
    ids = llm.tokenizer.encode("Ring attention passes K and V around the ring. " * 120)[:1024]
    llm = None
    rows = []
    for n in (2, 3):
        res = context_parallel_prefill(path, ids, world_size=n, backend="ref")
        total = sum(res.bytes_sent)
        formula = cp_bytes_per_prefill(spec, n, len(ids), kv_bytes_per_elem=4)
        rows.append(
            [f"CP={n}: K/V around the ring, {len(ids)}-token prefill, all ranks",
             f"{total / len(ids):,.0f}", f"(c-1) x 2 x L x KvH x hd x 4 = {formula / len(ids):,.0f}",
             f"{total / len(ids):,.0f}"]
        )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- 2. step time
def step_rows(backend: str, tokens: int) -> list[list[str]]:
    path = str(resolve("smollm2").path)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    rows = []
    for tp, pp in ((1, 1), (3, 1), (1, 2), (1, 3)):
        with LLM(path, backend=backend, tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
            llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
            for streams in (1, 8):
                if llm.executor is not None:
                    llm.executor.reset_stats()
                t0 = time.perf_counter()
                outs = llm.generate(PROMPTS[:streams], params)
                wall = time.perf_counter() - t0
                out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                busy, bubble = "-", "-"
                if pp > 1:
                    st = llm.executor.step_stats()
                    busy = (
                        " / ".join(f"{b:.2f}" for b in st["stage_busy_s"])
                        + f" of {st['wall_s']:.2f}"
                    )
                    bubble = f"{st['bubble_measured']:.0%} vs {st['bubble_formula']:.0%}"
                rows.append(
                    [f"tp={tp} pp={pp}", str(tp * pp), str(streams), f"{out_tokens / wall:.1f}",
                     busy, bubble]
                )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- 3. formulas
def interconnect_rows() -> list[list[str]]:
    spec, h100 = KNOWN_MODELS["Llama-3-70B"], GPUS["H100-80GB"]
    rows = []
    for name, degree, link in (
        ("TP", 8, "NVLink4 (H100 SXM)"),
        ("TP", 8, "InfiniBand NDR 400G"),
        ("PP", 2, "InfiniBand NDR 400G"),
    ):
        read_s = weights_bytes(spec.n_params, 16) / degree / (h100.bandwidth_gb_s * 1e9)
        for batch in (1, 64):
            if name == "TP":
                nbytes = batch * tp_bytes_per_token(spec, degree)
                comm = LINKS[link].seconds(nbytes, tp_messages_per_token(spec, degree))
            else:
                comm = LINKS[link].seconds(batch * pp_bytes_per_token(spec, degree), degree - 1)
            rows.append(
                [f"{name}={degree}", link, str(batch), f"{nbytes_str(name, spec, degree, batch)}",
                 f"{comm * 1e3:.2f}", f"{read_s * 1e3:.2f}"]
            )  # fmt: skip
    return rows


def nbytes_str(name: str, spec: ModelSpec, degree: int, batch: int) -> str:
    per = tp_bytes_per_token(spec, degree) if name == "TP" else pp_bytes_per_token(spec, degree)
    return f"{batch * per / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------- 4. PD
def pd_markdown() -> str:
    script = Path(__file__).resolve().parent / "bench_pd.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=3600, check=True
    )
    return done.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", default="cpu", help="backend of the TP/PP runs (default cpu)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    ap.add_argument("--skip-pd", action="store_true", help="leave out bench_pd.py's run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()

    parts = [
        "## Distributed inference: traffic, step time, and prefill/decode disaggregation\n",
        _report.run_header(
            backend=args.backend,
            model="SmolLM2-135M-Instruct Q4_1 (EP: a tiny random Mixtral)",
            threads=torch.get_num_threads(),
            command="python benchmarks/bench_parallel.py " + " ".join(sys.argv[1:]),
        ),
        "Every process of a run shares this machine's cores; all ranks talk over gloo on "
        "loopback. Rerun to refresh; lesson 14 measures the same quantities live.\n",
        "### Bytes per token handed to torch.distributed, against the formula\n",
        "Payload = what the code hands to the collective, summed as stated; for TP the last "
        "column applies the ring all-reduce's 2(N-1)/N to get what one rank sends on the wire. "
        "fp32 activations and K/V (the engine's dtype), so x 4 bytes.\n",
        _report.markdown_table(
            ["strategy", "measured bytes/token", "formula", "on the wire per rank"],
            traffic_rows(args.backend, args.tokens),
        ),
        f"\n### Decode throughput and where a step goes ({args.backend} backend, "
        f"{args.tokens} tokens per stream)\n",
        _report.markdown_table(
            [
                "layout",
                "processes",
                "streams",
                "output tok/s",
                "stage busy s (of wall)",
                "bubble measured vs (p-1)/(m+p-1)",
            ],
            step_rows(args.backend, args.tokens),
        ),  # fmt: skip
        f"\n{os.cpu_count()} cores for up to 3 processes: splitting a 135M model only adds "
        "communication and contention here. Tensor parallelism pays when each rank has its own "
        "accelerator and memory bandwidth; the measured bytes above, divided by a real link's "
        "bandwidth plus its latency per collective, say what it costs there:\n",
        "### The same formulas on real interconnects (Llama-3-70B, fp16, one decode step)\n",
        _report.markdown_table(
            ["strategy", "link", "batch", "bytes per rank", "comm ms", "weights read ms (H100)"],
            interconnect_rows(),
        ),
    ]
    if not args.skip_pd:
        parts += [
            "\n### Prefill/decode disaggregation (benchmarks/bench_pd.py, same run)\n",
            pd_markdown(),
        ]
    markdown = "\n".join(parts)
    print(markdown)
    if not args.no_write:
        print("wrote", _report.write_section("parallel", markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
