"""Tensor parallelism (minillm/parallel): a model split over 2 or 3 processes computes the same
logits and greedy tokens as one process, refuses sizes that do not divide it, and never leaves a
worker behind: not after close(), not after the LLM is dropped, not when a worker is killed.

Every test that starts workers gets them through the `make_tp` fixture, which shuts them down
(killing any survivor) whatever the test did.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.config import ModelConfig
from minillm.formats.blocks import QuantTensor, quantize
from minillm.loader import read_model_files
from minillm.parallel import traffic
from minillm.parallel.executor import ParallelExecutor
from minillm.parallel.shard import column_split_reason, columns, shard_weights, vocab_rows
from minillm.parallel.sizes import check_tp_size, valid_tp_sizes
from minillm.testing import make_tiny_model, spawned_children

DEADLINE_S = 120.0  # generous: a loaded 2-core machine takes seconds to spawn a worker
PROMPTS = [
    "Tensor parallelism splits every weight matrix across ranks.",  # > 1 chunk of 8 tokens
    "The quick brown fox",
    "def add(a, b):",
]


def _make_model(folder: Path, arch: str) -> Path:
    """A 2-layer random model whose 12 heads, 6 KV heads and FFN of 192 split over 2 or 3
    ranks (make_tiny_model's 4 heads and 2 KV heads allow only 2). qwen2: tied lm_head and
    q/k/v biases, so both the tied vocabulary shard and the bias shards are exercised."""
    shape = dict(
        hidden_size=96, intermediate_size=192, num_attention_heads=12, num_key_value_heads=6
    )
    return make_tiny_model(folder, arch, seed=0, **shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {arch: _make_model(root / arch, arch) for arch in ("llama", "qwen2")}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _executor(llm: LLM) -> ParallelExecutor:
    return llm.engine.runner.executor


@pytest.fixture
def make_tp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LLM]]:
    """LLM(..., tensor_parallel_size=tp) on ref; its workers are shut down after the test,
    and any survivor killed. Only the executors are kept, so a test can drop its LLM."""
    monkeypatch.setenv("MINILLM_TP_TIMEOUT_S", "60")  # well inside DEADLINE_S
    executors: list[ParallelExecutor] = []
    before = spawned_children()

    def make(path: Path, tp: int, backend: str = "ref", **kwargs: object) -> LLM:
        llm = LLM(str(path), backend=backend, tensor_parallel_size=tp, **kwargs)
        executors.append(_executor(llm))
        return llm

    try:
        yield make
    finally:
        for ex in executors:
            for pid in ex.worker_pids:  # a worker the test stopped must be able to die
                if _running(pid):
                    os.kill(pid, signal.SIGCONT)
            ex.shutdown()
        for pid in spawned_children() - before:
            os.kill(pid, signal.SIGKILL)


def _run(llm: LLM, params: list[SamplingParams]) -> tuple[list, list[torch.Tensor]]:
    """Token ids of every completion, and the logits of every step (what the sampler saw)."""
    seen: list[torch.Tensor] = []
    real = llm.engine._sample

    def spy(logits: torch.Tensor, to_sample: list) -> list:
        seen.append(logits.clone())
        return real(logits, to_sample)

    llm.engine._sample = spy
    outs = llm.generate(PROMPTS, params)
    return [[c.token_ids for c in o.outputs] for o in outs], seen


# ---------------------------------------------------------------------------------- sizes
def test_sizes_that_do_not_divide_are_refused_with_the_ones_that_do() -> None:
    smollm2 = ModelConfig(
        arch="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    assert valid_tp_sizes(smollm2) == [1, 3]
    check_tp_size(smollm2, 3)
    with pytest.raises(ValueError, match=r"num_heads=9 and num_kv_heads=3.*one of: 1, 3$"):
        check_tp_size(smollm2, 2)
    with pytest.raises(ValueError, match="positive integer"):
        check_tp_size(smollm2, 0)


def test_llm_refuses_a_bad_size_before_starting_any_worker(models: dict[str, Path]) -> None:
    before = spawned_children()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 .*one of: 1, 2, 3, 6$"):
        LLM(str(models["llama"]), backend="ref", tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 exceeds .* 2 layers"):
        LLM(str(models["llama"]), backend="cpu", pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        LLM(str(models["llama"]), backend="ref", tensor_parallel_size=0)
    assert spawned_children() == before


# ---------------------------------------------------------------------------------- shards
def test_vocabulary_shards_are_padded_and_concatenate_back() -> None:
    full = np.arange(10 * 32, dtype=np.float32).reshape(10, 32)
    w = QuantTensor.from_array(full, "F32")
    parts = [vocab_rows(w, r, 3).dequantize().reshape(4, 32) for r in range(3)]
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(joined[:10], full)
    np.testing.assert_array_equal(joined[10:], 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weight_shards_put_back_together_are_the_weights(
    models: dict[str, Path], arch: str
) -> None:
    config, weights, _ = read_model_files(models[arch])
    shards = [shard_weights(weights, config, r, 3) for r in range(3)]

    def deq(t: QuantTensor) -> np.ndarray:
        return t.dequantize().reshape(t.shape)

    for i, lw in enumerate(weights.layers):
        for name in ("wq", "wk", "wv", "w_gate", "w_up", "bq", "bk", "bv"):  # output rows
            if getattr(lw, name) is None:
                continue
            got = np.concatenate([deq(getattr(s.layers[i], name)) for s in shards])
            np.testing.assert_array_equal(got, deq(getattr(lw, name)), err_msg=name)
        for name in ("wo", "w_down"):  # input columns
            got = np.concatenate([deq(getattr(s.layers[i], name)) for s in shards], axis=1)
            np.testing.assert_array_equal(got, deq(getattr(lw, name)), err_msg=name)
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    got = np.concatenate([deq(s.lm_head) for s in shards])
    np.testing.assert_array_equal(got[: config.vocab_size], deq(head))


@pytest.mark.parametrize(("fmt", "cols", "tp"), [("Q4_1", 192, 3), ("Q8_0", 128, 2)])
def test_row_parallel_shards_of_quantized_blocks_stay_quantized(
    fmt: str, cols: int, tp: int
) -> None:
    """Input columns split on block boundaries are byte slices of each row: same format, and
    the shards' values side by side are the matrix's values exactly."""
    w = quantize(np.random.default_rng(0).standard_normal((8, cols)).astype(np.float32), fmt)
    assert column_split_reason(w, tp) is None
    parts = [columns(w, r, tp) for r in range(tp)]
    assert all(p.format == fmt and p.shape == (8, cols // tp) for p in parts)
    joined = np.concatenate([p.dequantize().reshape(p.shape) for p in parts], axis=1)
    np.testing.assert_array_equal(joined, w.dequantize().reshape(w.shape))


def test_a_split_inside_a_block_dequantizes_that_matrix_and_says_why() -> None:
    w = quantize(np.random.default_rng(0).standard_normal((4, 768)).astype(np.float32), "Q4_K")
    why = column_split_reason(w, 3)  # 256 per rank: whole Q4_K blocks
    assert why is None
    w = quantize(np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32), "Q4_K")
    why = column_split_reason(w, 2)  # 256 per rank again
    assert why is None
    why = column_split_reason(w, 4)  # 128 per rank: half a block
    assert why is not None and "not a multiple of Q4_K's block of 256" in why
    parts = [columns(w, r, 4) for r in range(4)]
    assert all(p.format == "F32" for p in parts)
    joined = np.concatenate([p.dequantize().reshape(p.shape) for p in parts], axis=1)
    np.testing.assert_array_equal(joined, w.dequantize().reshape(w.shape))


# ---------------------------------------------------------------------------------- runs
@pytest.mark.parametrize(
    ("arch", "tp", "backend"), [("llama", 2, "ref"), ("qwen2", 3, "ref"), ("qwen2", 2, "cpu")]
)
def test_tensor_parallel_matches_one_process(
    models: dict[str, Path], make_tp: Callable[..., LLM], arch: str, tp: int, backend: str
) -> None:
    """Same tokens, same logits (fp32 tolerance) in every step: chunked prefill mixed with
    decode (a budget of 8 tokens), a step that samples nothing, and an n=2 request whose fork
    copies a shared KV block (copy-on-write must happen on every rank)."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    forked = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    params = [greedy, greedy, forked]
    kwargs = dict(num_kv_blocks=64, max_num_batched_tokens=8)
    want_tokens, want_logits = _run(LLM(str(models[arch]), backend=backend, **kwargs), params)

    llm = make_tp(models[arch], tp, backend, **kwargs)
    pids = _executor(llm).worker_pids
    assert len(pids) == tp - 1 and all(_running(p) for p in pids)
    got_tokens, got_logits = _run(llm, params)

    assert got_tokens == want_tokens
    assert any(x.shape[0] == 0 for x in want_logits)  # the step that sampled nothing happened
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    llm.close()
    assert not any(_running(p) for p in pids)


def test_workers_end_with_close_with_a_with_block_and_with_the_llm(
    models: dict[str, Path], make_tp: Callable[..., LLM]
) -> None:
    before = spawned_children()
    with make_tp(models["llama"], 2) as llm:
        pids = _executor(llm).worker_pids
        llm.generate("The quick brown fox", SamplingParams(max_tokens=2))
    assert not any(_running(p) for p in pids)
    llm.close()  # a second close is harmless

    llm = make_tp(models["llama"], 2)
    pids = _executor(llm).worker_pids
    assert all(_running(p) for p in pids)
    del llm
    gc.collect()  # dropping the last reference shuts the workers down (weakref.finalize)
    assert not any(_running(p) for p in pids)
    assert spawned_children() == before


def test_a_worker_killed_between_steps_is_a_clear_error(
    models: dict[str, Path], make_tp: Callable[..., LLM]
) -> None:
    llm = make_tp(models["llama"], 2)
    worker = _executor(llm).procs[0]
    stream = llm.stream(
        "The quick brown fox", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    )
    next(stream)  # the run is under way
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(DEADLINE_S)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        for _ in stream:
            pass
    assert time.monotonic() - start < DEADLINE_S
    with pytest.raises(RuntimeError, match="rank 1"):  # the LLM stays failed, and says why
        llm.generate("hi", SamplingParams(max_tokens=2))


def test_a_worker_killed_inside_a_collective_is_a_clear_error_not_a_hang(
    models: dict[str, Path], make_tp: Callable[..., LLM]
) -> None:
    """Rank 1 is frozen (SIGSTOP), so rank 0 blocks in its first all-reduce; rank 1 is then
    killed. Rank 0 must see its peer's sockets close and raise, long before any deadline."""
    llm = make_tp(models["llama"], 2)
    worker = _executor(llm).procs[0]
    model = llm.engine.model
    real, entered = model._all_reduce, threading.Event()

    def spy(y: torch.Tensor) -> torch.Tensor:
        entered.set()
        return real(y)

    model._all_reduce = spy

    def kill_when_rank0_waits() -> None:
        entered.wait(DEADLINE_S)
        os.kill(worker.pid, signal.SIGKILL)

    os.kill(worker.pid, signal.SIGSTOP)
    killer = threading.Thread(target=kill_when_rank0_waits, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=4))
    elapsed = time.monotonic() - start
    killer.join(DEADLINE_S)
    assert entered.is_set() and elapsed < DEADLINE_S
    assert not _running(worker.pid)


def test_one_process_imports_nothing_distributed(models: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from minillm import LLM, SamplingParams\n"
        f"llm = LLM({str(models['llama'])!r}, backend='ref')\n"
        "llm.generate('hi', SamplingParams(max_tokens=2))\n"
        "print(sorted(m for m in sys.modules if m.startswith('minillm.parallel')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tp_traffic_is_two_all_reduces_of_the_tokens_per_layer(
    models: dict[str, Path], make_tp: Callable[..., LLM]
) -> None:
    """What benchmarks print: each rank hands 2 x layers x T x d x 4 bytes to all-reduces,
    T the tokens the steps computed (counted here from the scheduler's batches)."""
    llm = make_tp(models["llama"], 2, num_kv_blocks=64, max_num_batched_tokens=8)
    tokens: list[int] = []
    real = llm.engine.runner.execute

    def count(sched: object) -> object:
        tokens.append(sum(sched.num_new_tokens))  # type: ignore[attr-defined]
        return real(sched)

    llm.engine.runner.execute = count
    llm.executor.reset_stats()
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    cfg = llm.config
    want = 2 * cfg.num_layers * sum(tokens) * cfg.hidden_size * 4
    for snap in llm.executor.traffic_snapshots():  # rank 0's and the worker's
        assert snap["tp_all_reduce"]["bytes"] == want
        assert snap["tp_all_reduce"]["calls"] == 2 * cfg.num_layers * len(tokens)
    traffic.reset()


def test_the_bundled_model_on_the_cpu_backend_with_tp3_matches_one_process(
    bundled_gguf_path: Path, make_tp: Callable[..., LLM]
) -> None:
    """SmolLM2 (9 heads, 3 KV heads, Q4_1 blocks that stay quantized in every shard) split
    over 3 processes: the first steps' logits agree within fp32 summation-order tolerance and
    the greedy tokens are identical (a changed reduction order could flip a near-tie late;
    none does here). With fp32 activations on every rank: int8 ones round each activation
    to 8 bits, so a last-bit difference of the all-reduce can move a value across a rounding
    boundary and the ranks' sums stop being comparable at this tolerance."""
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one = LLM(str(bundled_gguf_path), backend="cpu", activations="fp32")
    want_tokens, want_logits = _run_prompts(one, prompts, greedy)
    llm = make_tp(bundled_gguf_path, 3, "cpu", activations="fp32")
    assert not llm.loaded.model.layers[0].wq.int8_activations  # rank 0's part, as asked
    assert all(
        getattr(lw, name).format == "Q4_1"
        for lw in llm.loaded.weights.layers
        for name in ("wq", "wo", "w_gate", "w_down")
    )
    got_tokens, got_logits = _run_prompts(llm, prompts, greedy)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits[:3], want_logits[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def _run_prompts(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple:
    seen: list[torch.Tensor] = []
    real = llm.engine._sample

    def spy(logits: torch.Tensor, to_sample: list) -> list:
        seen.append(logits.clone())
        return real(logits, to_sample)

    llm.engine._sample = spy
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], seen
