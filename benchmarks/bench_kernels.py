"""Kernel speed: the Numba ``cpu`` backend against ``ref``, HF transformers and llama.cpp.

    python benchmarks/bench_kernels.py [--threads 2] [--quick] [--model smollm2]
    python benchmarks/bench_kernels.py --model gemma3-270m       # Gemma 3 270M (Q4_K_M)

Side by side on the bundled model, interleaved repetitions, medians reported:

1. prefill tokens/s (one prompt of 256 tokens) and single-stream decode tokens/s for ``ref``
   (torch fp32), ``cpu`` (Numba, computing on the Q4_1/Q8_0 blocks), HF ``transformers`` (the
   same GGUF dequantized to fp32, greedy ``generate``) and llama.cpp (``llama_cpp``, only when
   importable);
2. batched decode: 16 sequences decoding together against one stream, and the compute roof
   such a batch runs into: peak fp32 multiply-adds per second / FLOPs per token;
3. the roofline: measured memory read bandwidth / bytes of weights read per decode step (the
   bandwidth is measured before and after the engines, and the higher one is used);
4. Numba compile time: first run with an empty cache against a run with a warm cache.

`cpu` decodes a decode-only step with one compiled call per layer (``kernels/cpu_layer.py``);
the row "`cpu`, op by op" is the same engine with that switched off, one kernel call per op.

The full run writes the "kernels" section of BENCHMARKS.md ("kernels-gemma3-270m" and so on
for another ``--model``, so each model keeps its own section); a model whose decode is not
fused (Gemma 3) has no op-by-op row, since it already runs op by op; ``--quick`` only prints unless
``--write`` is given. The machine's load average is recorded: other processes on the same
cores slow every engine here, parallel ones (2 threads waiting on each other) the most. By
default OpenMP's wait policy is left as the libraries set it (workers spin a while between
parallel regions), which is what a user gets and what a quiet machine rewards: on this 2-core
box ``passive`` (idle workers sleep at once) made `cpu` decode 2.5x slower, since one decode
step runs ~300 short parallel regions; on a busy machine spinning workers fight the other
processes, and ``--omp-wait-policy passive`` gives steadier numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _report module

import _report  # noqa: E402


@dataclass(frozen=True)
class Config:
    prefill_len: int  # prompt tokens for the prefill measurement
    decode_tokens: int  # tokens generated per decode measurement
    reps: int  # interleaved repetitions (medians reported)
    batch: int  # sequences in the batched-decode measurement
    batch_tokens: int  # tokens each of them generates


OP_BY_OP = "cpu-op-by-op"  # the cpu engine with its fused decode layer switched off
CPU_FP32 = "cpu-fp32"  # the cpu engine with fp32 activations (the exact path)
AGREEMENT_PROMPTS = 4  # prompts whose greedy continuations are compared between engines

FULL = Config(prefill_len=256, decode_tokens=64, reps=3, batch=16, batch_tokens=32)
QUICK = Config(prefill_len=64, decode_tokens=16, reps=1, batch=4, batch_tokens=8)


# ----------------------------------------------------------------------------- roofs
def measure_gemm_gflops(threads: int, reps: int = 5) -> float:
    """fp32 GFLOP/s of torch's own matmul (oneDNN / MKL) on 1024 x 1024 x 1024, the best run:
    what a tuned library reaches, beside the register-only peak of roofline.measure_fma_peak."""
    import torch

    from minillm.kernels.roofline import best_seconds

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    return 2 * 1024**3 / best_seconds(lambda: a @ b, reps) / 1e9


def linear_weights(model) -> list:  # noqa: ANN001 - cpu LlamaModel
    """Every matrix one decode step multiplies by: the lm_head and each layer's seven."""
    return [model.lm_head] + [w for layer in model.layers for w in
                              (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate,
                               layer.w_up, layer.w_down)]  # fmt: skip


def decode_flops_per_token(model) -> int:  # noqa: ANN001 - cpu LlamaModel
    """2 x the multiply-adds of every linear layer and the lm_head for one token."""
    return 2 * sum(w.rows * w.cols for w in linear_weights(model))


def decode_bytes_per_token(model, fp32: bool = False) -> int:  # noqa: ANN001 - cpu LlamaModel
    """Weight bytes one decode step streams: every linear layer and the lm_head, read once,
    plus the one embedding row and the norm vectors (the KV cache comes on top of this).
    ``fp32``: the same weights dequantized to float32, as ref and transformers hold them."""
    packed = linear_weights(model)
    norms = [model.final_norm] + [v for layer in model.layers
                                  for v in (layer.attn_norm, layer.ffn_norm)]  # fmt: skip
    if fp32:
        weights, embed_row = sum(4 * w.rows * w.cols for w in packed), 4 * model.embed.cols
    else:
        weights, embed_row = sum(w.nbytes for w in packed), model.embed.nbytes // model.embed.rows
    return weights + embed_row + sum(v.numel() * 4 for v in norms)


# ----------------------------------------------------------------------------- minillm
def prompt_ids(tokenizer, n: int) -> list[int]:  # noqa: ANN001
    """n token ids of real English text (repeated as needed), the same for every engine."""
    text = (_report.__doc__ or "") + " " + (__doc__ or "")
    ids = tokenizer.encode(text)
    return (ids * (n // len(ids) + 1))[:n]


def minillm_prefill(llm, ids: list[int]) -> float:  # noqa: ANN001
    from minillm import SamplingParams

    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
    return len(ids) / out.metrics.ttft


def minillm_decode(llm, ids: list[int], n: int) -> float:  # noqa: ANN001
    """Tokens/s after the first token: the time between tokens of one greedy stream."""
    from minillm import SamplingParams

    params = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
    m = llm.generate([ids], params)[0].metrics
    return (m.num_generation_tokens - 1) / m.eval_duration


def minillm_batched(llm, prompts: list[list[int]], n: int) -> float:  # noqa: ANN001
    """Aggregate decode tokens/s of sequences decoding together (prefill excluded)."""
    from minillm import SamplingParams

    params = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    start = max(o.metrics.first_token_time for o in outs)  # all prompts are prefilled
    end = max(o.metrics.finished_time for o in outs)
    return sum(o.metrics.num_generation_tokens - 1 for o in outs) / (end - start)


# ----------------------------------------------------------------------------- peers
def _rates(generate_seconds: Callable[[list[int], int], float]) -> tuple[Callable, Callable]:
    """(prefill tok/s, decode tok/s) of a peer timed by whole generate calls: prefill is one
    generated token; decode is what n + 1 tokens take beyond that."""

    def prefill(ids: list[int]) -> float:
        return len(ids) / generate_seconds(ids, 1)

    def decode(ids: list[int], n: int) -> float:
        return n / (generate_seconds(ids, n + 1) - generate_seconds(ids, 1))

    return prefill, decode


def hf_engine(gguf: Path) -> tuple[Callable, Callable]:
    """HF transformers on the same GGUF (dequantized to fp32): (prefill fn, decode fn)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF conversion's progress bar
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()

    def generate_seconds(ids: list[int], n: int) -> float:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)  # fmt: skip
        return time.perf_counter() - t0

    return _rates(generate_seconds)


def llama_cpp_engine(gguf: Path, threads: int) -> tuple[Callable, Callable, Callable] | None:
    """llama.cpp through llama-cpp-python, when it is installed: (prefill fn, decode fn,
    greedy fn: prompt ids, n -> the n greedy token ids)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, verbose=False)  # fmt: skip
    no_eos = {llm.token_eos(): -float("inf")}

    def generate_seconds(ids: list[int], n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.create_completion(ids, max_tokens=n, temperature=0.0, logit_bias=no_eos)
        return time.perf_counter() - t0

    def greedy(ids: list[int], n: int) -> list[int]:
        tokens: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens

    return (*_rates(generate_seconds), greedy)


# ----------------------------------------------------------------------------- agreement
def prefix_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean fraction of `want`'s greedy tokens that `got` matches before the first difference
    (after it, the two continue different texts and are no longer comparable)."""
    fractions = []
    for a, b in zip(got, want, strict=True):
        same = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        fractions.append(same / max(len(b), 1))
    return sum(fractions) / len(fractions)


def greedy_agreement(
    llms: dict, llama_greedy: Callable | None, prompts: list[list[int]], n: int
) -> dict[str, float]:
    """Greedy agreement of int8 activations with the fp32 path, and of both with llama.cpp
    (which quantizes activations to 8 bits the same way) when it is installed."""
    from minillm import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    tokens = {name: [o.outputs[0].token_ids for o in llms[name].generate(prompts, params)]
              for name in ("cpu", CPU_FP32)}  # fmt: skip
    result = {"`cpu` (int8) vs `cpu-fp32`": prefix_agreement(tokens["cpu"], tokens[CPU_FP32])}
    if llama_greedy is not None:
        reference = [llama_greedy(p, n) for p in prompts]
        result["`cpu` (int8) vs llama.cpp"] = prefix_agreement(tokens["cpu"], reference)
        result["`cpu-fp32` vs llama.cpp"] = prefix_agreement(tokens[CPU_FP32], reference)
    return result


# ----------------------------------------------------------------------------- compile time
_FIRST_RUN = (
    "import time; t0 = time.perf_counter()\n"
    "from minillm import LLM, SamplingParams\n"
    "llm = LLM({model!r}, backend={backend!r})\n"
    "ids = list(range(100, 140))  # 40 tokens: the prefill loops compile too\n"
    "llm.generate([ids, ids[:5]], SamplingParams(max_tokens=4, ignore_eos=True))\n"
    "print(time.perf_counter() - t0)\n"
)


def first_run_seconds(model: str, backend: str, threads: int, cache_dir: str) -> float:
    """Wall time of a fresh process: load, prefill and decode a few tokens."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(threads))
    code = _FIRST_RUN.format(model=model, backend=backend)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=1800)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def section_name(model: str) -> str:
    """BENCHMARKS.md section of a model: "kernels" for the default, else one of its own."""
    if model == "smollm2":
        return "kernels"
    return "kernels-" + (
        re.sub(r"[^a-z0-9_-]+", "-", Path(model).stem.lower()).strip("-") or "model"
    )


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="Numba, torch and llama.cpp threads")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a path...")
    ap.add_argument("--no-peers", action="store_true", help="skip HF transformers / llama.cpp")
    ap.add_argument("--omp-wait-policy", choices=["passive", "active", "unset"], default="unset",
                    help="OMP_WAIT_POLICY for every engine (set before torch and Numba start)")  # fmt: skip
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write BENCHMARKS.md (default: yes for the full run, no for --quick)")  # fmt: skip
    ap.add_argument("--output", type=Path, default=_report.BENCHMARKS_MD)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(args.threads, os.cpu_count() or 1)))
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before any OpenMP runtime loads

    import numba
    import torch

    from minillm import LLM
    from minillm.kernels import roofline

    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    kw = dict(enable_prefix_caching=False, max_num_seqs=max(cfg.batch, 1))
    llms = {b: LLM(args.model, backend=b, **kw) for b in ("ref", "cpu")}
    llms[CPU_FP32] = LLM(args.model, backend="cpu", activations="fp32", **kw)
    gguf = llms["cpu"].loaded.path
    ids = prompt_ids(llms["cpu"].tokenizer, cfg.prefill_len)
    short = ids[:16]
    bandwidth_before = roofline.measure_bandwidth(args.threads)
    minillms = dict(llms)
    if llms["cpu"].loaded.model.fused_decode:  # else `cpu` already runs op by op
        op_by_op = LLM(args.model, backend="cpu", **kw)
        op_by_op.loaded.model.fused_decode = False
        minillms[OP_BY_OP] = op_by_op
    engines: dict[str, tuple[Callable, Callable]] = {
        name: (lambda p, llm=llm: minillm_prefill(llm, p),
               lambda p, n, llm=llm: minillm_decode(llm, p, n))
        for name, llm in minillms.items()
    }  # fmt: skip
    notes, llama_greedy = [], None
    if not args.no_peers and gguf.suffix == ".gguf":
        engines["transformers"] = hf_engine(gguf)
        peer = llama_cpp_engine(gguf, args.threads)
        if peer is None:
            notes.append("llama.cpp: `llama_cpp` (llama-cpp-python) is not installed here")
        else:
            engines["llama.cpp"], llama_greedy = peer[:2], peer[2]
    for prefill, decode in engines.values():  # warm-up: compile kernels, fill caches
        prefill(ids[:32])
        decode(short, 4)

    prefill_tps: dict[str, list[float]] = {name: [] for name in engines}
    decode_tps: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(cfg.reps):  # interleaved, so slow phases of a shared machine hit all
        for name, (prefill, decode) in engines.items():
            prefill_tps[name].append(prefill(ids))
            decode_tps[name].append(decode(short, cfg.decode_tokens))
    prefill_med = {k: _median(v) for k, v in prefill_tps.items()}
    decode_med = {k: _median(v) for k, v in decode_tps.items()}

    prompts = [ids[i : i + 16] for i in range(cfg.batch)]
    batched = {b: _median([minillm_batched(llm, prompts, cfg.batch_tokens)
                           for _ in range(cfg.reps)]) for b, llm in llms.items()}  # fmt: skip

    agreement = greedy_agreement(llms, llama_greedy, prompts[:AGREEMENT_PROMPTS], cfg.batch_tokens)
    bandwidth_after = roofline.measure_bandwidth(args.threads)
    bandwidth = max(bandwidth_before, bandwidth_after)  # the stricter roofline
    fma_peak = roofline.measure_fma_peak(args.threads)
    int8_peak = roofline.measure_int8_peak(args.threads)
    gemm_gflops = measure_gemm_gflops(args.threads)
    flops_per_token = decode_flops_per_token(llms["cpu"].loaded.model)
    batch_ceiling = fma_peak * 1e9 / flops_per_token
    bytes_per_token = decode_bytes_per_token(llms["cpu"].loaded.model)
    fp32_bytes = decode_bytes_per_token(llms["cpu"].loaded.model, fp32=True)
    roofline = bandwidth * 1e9 / bytes_per_token
    engine_bytes = {"ref": fp32_bytes, "transformers": fp32_bytes}  # others read the blocks

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_run_seconds(args.model, "cpu", args.threads, cache_dir)
        warm = first_run_seconds(args.model, "cpu", args.threads, cache_dir)
    ref_first = first_run_seconds(args.model, "ref", args.threads, tempfile.gettempdir())
    load_after = os.getloadavg()

    # ------------------------------------------------------------------ markdown
    hf, lc = decode_med.get("transformers"), decode_med.get("llama.cpp")
    rows = []
    for name in engines:
        d = decode_med[name]
        label = f"`{name}`" if name in llms else "`cpu`, op by op" if name == OP_BY_OP else name
        label += " (int8 activations)" if name == "cpu" else ""
        rows.append([label, _fmt(prefill_med[name]), _fmt(d),
                     f"{d / hf:.2f}x" if hf else "-", f"{d / lc:.2f}x" if lc else "-",
                     f"{d * engine_bytes.get(name, bytes_per_token) / bandwidth / 1e7:.0f}%"])  # fmt: skip
    table = _report.markdown_table(
        ["engine", f"prefill tok/s ({len(ids)}-token prompt)", "decode tok/s (1 stream)",
         "decode vs transformers", "decode vs llama.cpp", "decode / own roofline"], rows)  # fmt: skip
    brows = [[f"`{b}`", _fmt(decode_med[b]), _fmt(batched[b]), f"{batched[b] / decode_med[b]:.1f}x"]
             for b in llms]  # fmt: skip
    btable = _report.markdown_table(
        ["backend", "1 stream tok/s", f"{cfg.batch} streams, aggregate tok/s", "ratio"], brows
    )
    cpu = decode_med["cpu"]
    verdicts = [f"`cpu` decode is {cpu / roofline:.0%} of the roofline (target >= 40%)"]
    if hf:
        verdicts.append(f"{cpu / hf:.1f}x transformers (target >= 3x)")
    if lc:
        verdicts.append(f"{cpu / lc:.2f}x llama.cpp (target >= 0.5x)")
    verdicts.append(f"batched x{cfg.batch} = {batched['cpu'] / cpu:.1f}x one stream (target >= 6x)")
    exact = CPU_FP32
    verdicts.append(
        f"int8 against fp32 activations: single-stream decode {cpu / decode_med[exact]:.2f}x "
        f"(target >= 1x), prefill {prefill_med['cpu'] / prefill_med[exact]:.2f}x (target >= "
        f"1.5x) and {prefill_med['cpu'] / prefill_med['ref']:.2f}x `ref`'s (target >= 1x), "
        f"{cfg.batch}-stream aggregate {batched['cpu'] / batched[exact]:.2f}x (target >= 2x)"
    )
    agreement_rows = [[pair, f"{value:.0%}"] for pair, value in agreement.items()]
    agreement_table = _report.markdown_table(
        ["greedy tokens", "agreement (share of tokens before the first difference)"],
        agreement_rows,
    )
    command = "python benchmarks/bench_kernels.py" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads}" + (" --no-peers" if args.no_peers else "")
    if args.model != "smollm2":
        command += f" --model {args.model}"
    if args.omp_wait_policy != "unset":
        command += f" --omp-wait-policy {args.omp_wait_policy}"
    loaded = llms["cpu"].loaded
    model = f"{args.model} ({gguf.name}, {loaded.config.num_layers} layers)"
    body = (
        "## Kernels: the Numba `cpu` backend against `ref`, transformers and llama.cpp"
        + ("" if args.model == "smollm2" else f" ({args.model})")
        + "\n\n"
        + _report.run_header(
            backend="ref, cpu", model=model, threads=args.threads, command=command
        )  # fmt: skip
        + f"- Numba threads: {numba.get_num_threads()} (threading layer "
        f"{numba.threading_layer()}); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        f"; load average before/after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} (the machine has {os.cpu_count()} cores)\n"
        f"- medians of {cfg.reps} interleaved repetitions; decode = {cfg.decode_tokens} greedy "
        f"tokens after a {len(short)}-token prompt, timed after the first token; prefix "
        f"caching off\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"- total benchmark time: {time.perf_counter() - t_start:.0f} s\n\n"
        "### Prefill and single-stream decode\n\n" + table + "\n\n" + "; ".join(verdicts) + ".\n\n"
        "### Roofline: bandwidth / bytes per token\n\n"
        f"- measured read bandwidth ({args.threads} threads, 256 MiB array): "
        f"{bandwidth_before:.1f} GB/s before the engines ran, {bandwidth_after:.1f} GB/s after; "
        f"the higher, **{bandwidth:.1f} GB/s**, is used\n"
        f"- bytes read per decode step: {bytes_per_token / 1e6:.1f} MB (all linear weights in "
        f"their GGUF blocks, the tied Q8_0 lm_head, one embedding row, norms; KV cache extra)\n"
        f"- roofline = bandwidth / bytes per token = **{roofline:.0f} tokens/s** for `cpu` (and "
        f"llama.cpp, which reads the same blocks); `ref` and transformers hold the weights as fp32, "
        f"{fp32_bytes / 1e6:.0f} MB per token: roofline {bandwidth * 1e9 / fp32_bytes:.0f} "
        f"tokens/s\n"
        f"- `cpu` decode reads its weights at {cpu * bytes_per_token / 1e9:.1f} GB/s, "
        f"{cpu / roofline:.0%} of the measured bandwidth: on this machine it is "
        f"{'memory' if cpu > 0.6 * roofline else 'compute and per-op overhead'}-bound\n\n"
        "### Batched decode\n\n" + btable + "\n\n"
        f"Each step reads the weights once for all {cfg.batch} sequences, so the aggregate grows "
        "until the step becomes compute-bound. The compute roof: fused multiply-adds in registers "
        f"run at **{fma_peak:.0f} GFLOP/s** on {args.threads} threads (torch's own fp32 matmul, "
        f"1024 x 1024 x 1024, reaches {gemm_gflops:.0f}). A token costs "
        f"{flops_per_token / 1e6:.0f} MFLOP (2 x every weight), so no fp32 engine here can "
        f"decode more than **{batch_ceiling:.0f} tokens/s** in aggregate, "
        f"{batch_ceiling / cpu:.1f}x `cpu`'s single stream; 6x would need "
        f"{6 * cpu * flops_per_token / fma_peak / 1e7:.0f}% of that roof at T = {cfg.batch}. "
        f"`cpu`'s {cfg.batch}-stream batch computes at "
        f"{batched['cpu'] * flops_per_token / 1e9:.0f} GFLOP/s, "
        f"{batched['cpu'] / batch_ceiling:.0%} of the roof. int8 activations move the roof: "
        f"`vpdpbusd` chains in registers reach **{int8_peak:.0f} GOP/s** (a byte multiply-add "
        f"counts 2), {int8_peak / fma_peak:.1f}x the fp32 roof, so an int8 engine's ceiling is "
        f"{int8_peak * 1e9 / flops_per_token:.0f} tokens/s; `cpu`'s batch computes at "
        f"{batched['cpu'] * flops_per_token / int8_peak / 1e9:.0%} of it, `cpu-fp32`'s at "
        f"{batched[exact] * flops_per_token / fma_peak / 1e9:.0%} of the fp32 roof.\n\n"
        f"### Greedy agreement ({AGREEMENT_PROMPTS} prompts x {cfg.batch_tokens} tokens)\n\n"
        + agreement_table
        + "\n\n"
        "### Numba compile time (fresh process: load + prefill + 4 decode steps)\n\n"
        f"- `cpu`, empty Numba cache (compiles every kernel): {cold:.1f} s\n"
        f"- `cpu`, warm cache (`cache=True` loads the machine code): {warm:.1f} s\n"
        f"- `ref` (nothing to compile), same work: {ref_first:.1f} s\n"
    )
    print(body)
    if args.write if args.write is not None else not args.quick:
        print(f"wrote {_report.write_section(section_name(args.model), body, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
