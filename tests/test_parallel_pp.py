"""Pipeline parallelism (minillm/parallel/pipeline.py): contiguous layer stages, micro-batches
from each step's batch, logits back to rank 0. A model split into stages (alone, or with
tensor parallelism inside each stage) computes the same logits and greedy tokens as one
process, sends exactly the activations the formula says, and reports its bubble.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.engine.scheduler import ScheduledBatch
from minillm.parallel import traffic
from minillm.parallel.executor import ParallelExecutor
from minillm.parallel.pipeline import bubble_formula, split_schedule
from minillm.parallel.sizes import stage_layers
from minillm.testing import make_tiny_model, spawned_children

PROMPTS = [
    "Pipeline parallelism gives every stage a few layers of the model.",  # > 1 chunk of 8
    "The quick brown fox",
    "def add(a, b):",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 layers (so 2 stages of 2, or 3 stages of 2+1+1); 12 heads and 6 KV heads (TP 2)."""
    root = tmp_path_factory.mktemp("pp-models")
    shape = dict(
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=12,
        num_key_value_heads=6,
        num_hidden_layers=4,
    )
    return {a: make_tiny_model(root / a, a, seed=1, **shape) for a in ("llama", "qwen2")}


@pytest.fixture
def make_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., LLM]]:
    """A parallel LLM whose workers are shut down (any survivor killed) after the test."""
    monkeypatch.setenv("MINILLM_TP_TIMEOUT_S", "60")
    executors: list[ParallelExecutor] = []
    before = spawned_children()

    def make(path: Path, **kwargs: object) -> LLM:
        llm = LLM(str(path), **kwargs)
        executors.append(llm.executor)
        return llm

    try:
        yield make
    finally:
        pids = [p for ex in executors for p in ex.worker_pids]
        for ex in executors:
            ex.shutdown()
        for pid in spawned_children() - before:
            os.kill(pid, signal.SIGKILL)
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        )


def _run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[list, list, list]:
    """Tokens of every completion, the logits of every step, the tokens each step computed."""
    seen: list[torch.Tensor] = []
    tokens: list[int] = []
    real_sample, real_execute = llm.engine._sample, llm.engine.runner.execute

    def spy(logits: torch.Tensor, to_sample: list) -> list:
        seen.append(logits.clone())
        return real_sample(logits, to_sample)

    def count(sched: ScheduledBatch) -> tuple:
        tokens.append(sum(sched.num_new_tokens))
        return real_execute(sched)

    llm.engine._sample, llm.engine.runner.execute = spy, count
    outs = llm.generate(prompts, params)
    return [[c.token_ids for c in o.outputs] for o in outs], seen, tokens


# ---------------------------------------------------------------------------------- pieces
def test_stages_are_contiguous_and_cover_every_layer_once() -> None:
    for layers, pp in ((30, 2), (30, 4), (4, 3), (5, 5)):
        stages = [stage_layers(layers, pp, s) for s in range(pp)]
        assert [i for r in stages for i in r] == list(range(layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


def test_a_step_splits_into_balanced_micro_batches_in_order() -> None:
    seqs = [object() for _ in range(5)]
    sched = ScheduledBatch(seqs=seqs, num_new_tokens=[1, 1, 1, 1, 8], blocks_to_copy=[(1, 2)])
    parts = split_schedule(sched, 2)
    assert [p.seqs for p in parts] == [seqs[:4], seqs[4:]]  # 4 tokens | 8 tokens, in order
    parts = split_schedule(sched, 3)
    assert [s for p in parts for s in p.seqs] == seqs and all(p.seqs for p in parts)
    assert len(split_schedule(sched, 9)) == 5  # never more micro-batches than sequences
    assert split_schedule(sched, 1) == [sched]
    assert bubble_formula(2, 2) == pytest.approx(1 / 3)
    assert bubble_formula(4, 1) == pytest.approx(3 / 4)


# ---------------------------------------------------------------------------------- runs
@pytest.mark.parametrize(
    ("arch", "backend", "tp", "pp"),
    [("llama", "ref", 1, 2), ("qwen2", "cpu", 1, 3), ("qwen2", "ref", 2, 2)],
)
def test_pipeline_matches_one_process(
    models: dict[str, Path], make_llm: Callable[..., LLM], arch: str, backend: str, tp: int, pp: int
) -> None:
    """Chunked prefill mixed with decode (8 tokens a step), a step that samples nothing and an
    n=2 fork that copies a KV block: the same tokens and (fp32 tolerance) logits as one
    process; stage 0 sends each token's d floats once per micro-batch, the timings add up, and
    embeddings equal one process's."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    forked = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    params = [greedy, greedy, forked]
    kwargs = dict(backend=backend, num_kv_blocks=64, max_num_batched_tokens=8)
    one = LLM(str(models[arch]), **kwargs)
    want_tokens, want_logits, _ = _run(one, PROMPTS, params)
    inputs = [one.tokenizer.encode(p) for p in PROMPTS[:2]]
    want_vectors = one.engine.embed(inputs)

    llm = make_llm(models[arch], tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
    assert len(llm.executor.worker_pids) == tp * pp - 1
    assert list(llm.engine.model.layer_ids) == list(stage_layers(4, pp, 0))
    llm.executor.reset_stats()
    got_tokens, got_logits, tokens = _run(llm, PROMPTS, params)

    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    hidden = llm.config.hidden_size
    snaps = llm.executor.traffic_snapshots()
    for rank in range(tp * (pp - 1)):  # every rank but the last stage's passes activations on
        assert snaps[rank]["pp_send"]["bytes"] == sum(tokens) * hidden * 4
    stats = llm.executor.step_stats()
    assert stats["steps"] == len(tokens) and len(stats["stage_busy_s"]) == pp
    assert all(0 < b <= stats["wall_s"] for b in stats["stage_busy_s"])
    assert 0 <= stats["bubble_measured"] < 1
    assert stats["mean_micro_batches"] > 1  # some steps really were split
    # embeddings: every rank joins the pass, the last stage's hidden states come back
    got_vectors = llm.engine.embed(inputs)
    torch.testing.assert_close(torch.tensor(got_vectors), torch.tensor(want_vectors))
    traffic.reset()


def test_the_bundled_model_in_two_stages_matches_one_process(
    bundled_gguf_path: Path, make_llm: Callable[..., LLM]
) -> None:
    """SmolLM2's 30 layers as 2 stages of 15 on the cpu backend: identical greedy tokens."""
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    greedy = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3
    want, _, _ = _run(LLM(str(bundled_gguf_path), backend="cpu"), prompts, greedy)
    llm = make_llm(bundled_gguf_path, backend="cpu", pipeline_parallel_size=2)
    assert list(llm.engine.model.layer_ids) == list(range(15))
    got, _, _ = _run(llm, prompts, greedy)
    assert got == want


def test_more_stages_than_layers_is_refused_before_any_worker_starts(
    models: dict[str, Path],
) -> None:
    before = spawned_children()
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=5 exceeds .* 4 layers.*1 to 4"):
        LLM(str(models["llama"]), backend="ref", pipeline_parallel_size=5)
    with pytest.raises(ValueError, match="positive integer"):
        LLM(str(models["llama"]), backend="ref", pipeline_parallel_size=0)
    assert spawned_children() == before
