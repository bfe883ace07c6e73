"""What compression costs: size, perplexity, answers and speed of every method, in one run.

    .venv/bin/python benchmarks/bench_compression.py            # writes section "compression"
    .venv/bin/python benchmarks/bench_compression.py --tokens 1024 --distill-seconds 60  # quick

Reference: the bundled SmolLM2-135M-Instruct file is already Q4_1 (token_embd Q8_0), and no
higher-precision copy is available offline. So "fp32" below is *that file dequantized to fp32*,
and every method starts from those fp32 weights. One consequence is measured, not hidden: plain
int4 with group 32 (= Q4_1) lands back on the grid the weights already sit on, so it is nearly
lossless here; the group-128 rows show what 4-bit rounding costs weights that are not already
on a 4-bit grid, and are where AWQ is compared with plain round-to-nearest (RTN).

Perplexity: `compress.evaluate` on the stdlib-docs corpus (first --tokens tokens, windows of
--window). Task check: greedy answers to `evaluate.TASK_PROMPTS` compared with the fp32
model's (exact = identical answers, prefix = share of tokens matched before the first
difference). Decode speed: one sequence, 32 new tokens, after a warm-up, on each backend.
Calibration (AWQ, Wanda, structured pruning, distillation) uses the docstrings of *other*
stdlib modules, never the evaluation text.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, run_header, write_section  # noqa: E402

from minillm import LLM, SamplingParams  # noqa: E402
from minillm.compress.awq import awq_scale_model  # noqa: E402
from minillm.compress.calibration import (  # noqa: E402
    calibration_ids,
    calibration_text,
    capture_activations,
)
from minillm.compress.distill import (  # noqa: E402
    DistillConfig,
    distill,
    save_student,
    teacher_targets,
)
from minillm.compress.evaluate import (  # noqa: E402
    corpus_fingerprint,
    greedy_answers,
    perplexity,
    stdlib_docs_corpus,
    task_check,
)
from minillm.compress.export import save_quantized_gguf, source_metadata  # noqa: E402
from minillm.compress.kv_int8 import kv_bytes_per_token, kv_int8_ops  # noqa: E402
from minillm.compress.prune import (  # noqa: E402
    prune_heads,
    prune_mlp_channels,
    prune_model,
    sparsity_of,
)
from minillm.compress.quantize import QuantizedModel, dequantized_model, quantize_model  # noqa: E402
from minillm.compress.student import StudentLlama  # noqa: E402
from minillm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from minillm.kernels import get_backend, resolve_backend_name  # noqa: E402
from minillm.model.llama import LlamaModel  # noqa: E402
from minillm.model.weights import ModelWeights  # noqa: E402

SPEED_PROMPT = "Explain in two sentences why quantization makes decoding faster."


@dataclass
class Row:
    method: str
    stored: str
    mb: float | None
    bpw: float | None
    ppl: float
    task: tuple[float, float] | None
    speed: dict[str, float]
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = LLM("smollm2", backend="ref")
        self.path = self.base.loaded.path
        self.config, self.tokenizer = self.base.config, self.base.tokenizer
        self.fp32 = dequantized_model(self.base.loaded.weights)
        text = stdlib_docs_corpus()
        self.fingerprint = corpus_fingerprint(text)
        self.eval_ids = self.tokenizer.encode(text)[: args.tokens]
        self.backends = [b for b in ("ref", "cpu") if _available(b)]
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_compression_"))
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.reference_answers: list[list[int]] | None = None
        self.reference_ppl: float | None = None
        self._acts = None

    # -------------------------------------------------------------- measuring one model
    def llm_for(self, config, weights: ModelWeights, backend: str, kv_int8: bool = False) -> LLM:  # noqa: ANN001
        """An LLM (engine, tokenizer, template) around in-memory weights."""
        ops = get_backend(backend)
        if kv_int8:
            ops = kv_int8_ops(ops)
        llm = LLM.__new__(LLM)
        model = LlamaModel(config, weights, ops)
        llm.loaded = replace(self.base.loaded, config=config, weights=weights, model=model,
                             backend=ops)  # fmt: skip
        llm.engine = LLMEngine(model, self.tokenizer, EngineConfig(kv_cache_memory="64MiB"))
        llm._ids = iter(range(10**9))
        return llm

    def measure(self, method: str, stored: str, config, weights: ModelWeights,  # noqa: ANN001
                mb: float | None, bpw: float | None, note: str = "",
                kv_int8: bool = False) -> Row:  # fmt: skip
        t0 = time.perf_counter()
        llm = self.llm_for(config, weights, "ref", kv_int8)
        ppl = perplexity(llm.loaded.model, self.eval_ids, self.args.window).value
        answers = greedy_answers(llm)
        if self.reference_answers is None:
            self.reference_answers, self.reference_ppl = answers, ppl
        check = task_check(answers, self.reference_answers)
        speed = {}
        for backend in self.backends:
            speed[backend] = decode_speed(self.llm_for(config, weights, backend, kv_int8))
        row = Row(method, stored, mb, bpw, ppl, (check.exact, check.prefix), speed, note)
        self.rows.append(row)
        delta = 100 * (ppl - self.reference_ppl) / self.reference_ppl
        print(f"{method:34s} ppl {ppl:8.3f} ({delta:+6.2f}%)  task {check.exact:.2f}/"
              f"{check.prefix:.2f}  {speed}  [{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
        del llm
        gc.collect()
        return row

    def activations(self):  # noqa: ANN201
        if self._acts is None:
            calib = calibration_ids(self.tokenizer, self.args.calibration_tokens)
            self._acts = capture_activations(self.config, self.fp32, calib)
        return self._acts

    # -------------------------------------------------------------- the methods
    def quantized(self, method: str, label: str) -> None:
        calib = calibration_ids(self.tokenizer, self.args.calibration_tokens)
        t0 = time.perf_counter()
        if method.startswith("awq"):
            group = 128 if method.endswith("g128") else 32
            scaled = awq_scale_model(self.config, self.fp32, calib, group_size=group,
                                     activations=self.activations())  # fmt: skip
            qm = quantize_model(self.config, scaled.weights, method.replace("awq-", ""))
            qm = replace(qm, method=method)
            improved = sum(s.error < s.rtn_error for s in scaled.searches)
            note = (f"AWQ search {time.perf_counter() - t0:.0f} s; lower layer error than RTN in "
                    f"{improved}/{len(scaled.searches)} searches")  # fmt: skip
        else:
            qm = quantize_model(self.config, self.fp32, method, calib)
            note = ""
        mb = None
        if qm.storable:
            path = save_quantized_gguf(qm, self.tmp / f"{method}.gguf",
                                       source_metadata(self.path, self.config, self.tokenizer))  # fmt: skip
            mb = path.stat().st_size / 1e6
            # the written file must give back the model measured here
            written = LLM(str(path), backend="ref")
            ids = self.eval_ids[:64]
            from minillm.model.scoring import sequence_logits

            a = sequence_logits(written.loaded.model, ids)
            b = sequence_logits(self.llm_for(self.config, qm.weights, "ref").loaded.model, ids)
            assert torch.allclose(a, b, atol=1e-4), f"{method}: written file differs"
            del written
            path.unlink()
        self.measure(label, _stored(qm), self.config, qm.weights, mb, qm.linear_bits_per_weight,
                     note)  # fmt: skip

    def kv_int8(self) -> None:
        fp32_kv, int8_kv = (kv_bytes_per_token(self.config, d) for d in ("fp32", "int8"))
        note = (f"KV cache {int8_kv} B/token vs {fp32_kv} fp32 ({fp32_kv / int8_kv:.1f}x smaller), "
                "computed; quality measured by rounding K/V through int8 in store_kv")  # fmt: skip
        self.measure("fp32 weights + KV int8", "F32, KV int8", self.config, self.fp32, None, 32.0,
                     note, kv_int8=True)  # fmt: skip

    def unstructured(self, method: str, label: str) -> None:
        acts = self.activations() if method.startswith("wanda") else None
        pruned = prune_model(self.fp32, method, 0.5, acts)
        note = f"sparsity {sparsity_of(pruned):.3f} of the block linears (stored dense)"
        self.measure(label, "F32 (zeros dense)", self.config, pruned, None, 32.0, note)

    def structured(self) -> None:
        acts = self.activations()
        cfg, w = prune_heads(self.config, self.fp32, acts, kv_groups=2)
        cfg, w = prune_mlp_channels(cfg, w, acts, keep=1024)
        params_before = self.config.num_params
        note = (f"{self.config.num_heads}->{cfg.num_heads} heads ({self.config.num_kv_heads}->"
                f"{cfg.num_kv_heads} KV groups), FFN {self.config.intermediate_size}->"
                f"{cfg.intermediate_size}; params {params_before / 1e6:.1f}M -> "
                f"{cfg.num_params / 1e6:.1f}M; no retraining")  # fmt: skip
        self.measure("structured: 2/3 KV groups, FFN 2/3", "F32", cfg, w, cfg.num_params * 4e-6,
                     32.0, note)  # fmt: skip

    def distillation(self) -> None:
        a = self.args
        acts = self.activations()
        s_cfg, s_w = prune_mlp_channels(self.config, self.fp32, acts, keep=a.student_ffn)
        student = StudentLlama(s_cfg, s_w)
        train = self.tokenizer.encode(calibration_text())[: a.distill_tokens]
        targets = teacher_targets(self.config, self.fp32, train, seq_len=128, top_k=64)
        init_note = (f"student = teacher with FFN {self.config.intermediate_size}->{a.student_ffn} "
                     f"({s_cfg.num_params / 1e6:.1f}M params), before training")  # fmt: skip
        self.measure("distill: student before training", "F32", s_cfg, s_w,
                     s_cfg.num_params * 4e-6, 32.0, init_note)  # fmt: skip
        kd = distill(student, targets, DistillConfig(alpha=a.alpha, temperature=a.temperature,
                                                     lr=a.lr, time_budget_s=a.distill_seconds))  # fmt: skip
        hard = distill(student, targets, DistillConfig(alpha=0.0, lr=a.lr, max_steps=kd.steps))
        for label, res, how in (
            (f"distill: logits (T={a.temperature:g}, alpha={a.alpha:g})", kd, "teacher top-64 KD"),
            ("distill: hard labels only (same steps)", hard, "cross-entropy on the text"),
        ):
            folder = save_student(res.student, self.tmp / label.split(":")[1].strip()[:8],
                                  self.tokenizer)  # fmt: skip
            loaded = LLM(str(folder), backend="ref")  # the saved HF folder is what is measured
            note = (f"{how}: {res.steps} steps x {a_batch(res)} tokens in {res.seconds:.0f} s "
                    f"(teacher targets {targets.seconds:.0f} s, {targets.num_tokens} tokens)")  # fmt: skip
            self.measure(label, "F32 (HF folder)", loaded.config, loaded.loaded.weights,
                         s_cfg.num_params * 4e-6, 32.0, note)  # fmt: skip
            del loaded

    # -------------------------------------------------------------- report
    def table(self) -> str:
        ref = self.reference_ppl
        header = ["method", "stored as", "MB", "bits/weight (linears)", "perplexity",
                  "Δ% vs fp32", "task exact / prefix"]  # fmt: skip
        header += [f"decode tok/s ({_backend_label(b)})" for b in self.backends]
        rows = []
        for r in self.rows:
            rows.append([
                r.method, r.stored, "—" if r.mb is None else f"{r.mb:.1f}",
                "—" if r.bpw is None else f"{r.bpw:.2f}", f"{r.ppl:.3f}",
                f"{100 * (r.ppl - ref) / ref:+.2f}",
                "—" if r.task is None else f"{r.task[0]:.2f} / {r.task[1]:.2f}",
                *[f"{r.speed[b]:.1f}" for b in self.backends],
            ])  # fmt: skip
        return markdown_table(header, rows)


def a_batch(res) -> int:  # noqa: ANN001
    return res.tokens_seen // max(res.steps, 1)


def _stored(qm: QuantizedModel) -> str:
    if qm.int8_names:
        return "I8 + F32 row scale"
    formats = sorted({lw.wq.format for lw in qm.weights.layers} |
                     {lw.w_down.format for lw in qm.weights.layers})  # fmt: skip
    return "+".join(formats) if qm.storable else "F32 (fake-quantized)"


def _available(backend: str) -> bool:
    try:
        get_backend(backend)
        return True
    except ValueError:
        return False


def _backend_label(b: str) -> str:
    return f"auto={resolve_backend_name('auto')}" if b == "auto" else b


def decode_speed(llm: LLM, new_tokens: int = 32) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    messages = [{"role": "user", "content": SPEED_PROMPT}]
    llm.chat(messages, replace(params, max_tokens=4))  # warm-up (and numba compilation)
    out = llm.chat(messages, params)[0]
    m = out.metrics
    return (m.num_generation_tokens - 1) / (m.finished_time - m.first_token_time)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--distill-tokens", type=int, default=4096, help="training tokens")
    p.add_argument("--distill-seconds", type=float, default=240.0, help="distillation time budget")
    p.add_argument("--student-ffn", type=int, default=768, help="the student's FFN width")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and numba threads (default 1: oversubscribed pools collapse on a shared box)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["quant", "prune", "distill"])
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    t0 = time.perf_counter()
    b = Bench(args)
    b.measure("fp32 (the bundled Q4_1 file, dequantized)", "F32", b.config, b.fp32,
              b.config.num_params * 4e-6, 32.0, "the reference")  # fmt: skip
    if "quant" not in args.skip:
        for method, label in (
            ("q8_0", "Q8_0"), ("int8", "int8 per channel (W8A16)"), ("q4_k", "Q4_K"),
            ("q4_0", "Q4_0"), ("int4", "int4 g32 asym (= Q4_1), RTN"),
            ("awq-int4", "AWQ + int4 g32 (Q4_1)"), ("int4-g128", "int4 g128 asym, RTN"),
            ("awq-int4-g128", "AWQ + int4 g128"),
        ):  # fmt: skip
            b.quantized(method, label)
        b.kv_int8()
    if "prune" not in args.skip:
        for method, label in (
            ("magnitude", "magnitude 50%"), ("wanda", "Wanda 50%"),
            ("magnitude-2:4", "magnitude 2:4"), ("wanda-2:4", "Wanda 2:4"),
        ):  # fmt: skip
            b.unstructured(method, label)
        b.structured()
    if "distill" not in args.skip:
        b.distillation()
    table = b.table()
    notes = "\n".join(f"- **{r.method}**: {r.note}" for r in b.rows if r.note)
    threads = torch.get_num_threads()
    header = run_header(
        backend=", ".join(_backend_label(x) for x in b.backends), model=f"{b.path.name}",
        threads=threads, command="python benchmarks/bench_compression.py " + " ".join(argv or sys.argv[1:]),
    )  # fmt: skip
    md = (
        "## Compression: quantization, pruning, distillation\n\n"
        + header
        + f"- perplexity: first {len(b.eval_ids)} tokens of the stdlib-docs corpus "
        f"({b.fingerprint}), windows of {args.window}; calibration: {args.calibration_tokens} "
        f"tokens of other stdlib modules' docs; run time {time.perf_counter() - t0:.0f} s; "
        f"load average at the end {os.getloadavg()[0]:.1f} (a shared machine: speeds are noisy)\n"
        '- reference ("fp32"): the bundled Q4_1 file dequantized to fp32; all methods start '
        "from it. MB = the written GGUF (or fp32 size for F32 models); — = an in-memory "
        "experiment with no GGUF layout. Perplexity and answers are computed on the ref (fp32) "
        "backend; only the speed columns use other backends.\n\n" + table + "\n\n" + notes + "\n"
    )
    print(md)
    if not args.no_write:
        write_section("compression", md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
