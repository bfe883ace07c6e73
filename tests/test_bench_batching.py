"""benchmarks/bench_batching.py on a tiny random model: the quantities it measures must be
internally consistent (token counts, waste from block tables, prefix-cache counters, identical
greedy outputs across modes). Timings are never checked. Also benchmarks/_report.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from minillm import LLM, SamplingParams
from minillm.loader import load_model
from minillm.testing import make_tiny_model

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("bench_batching")
report = sys.modules["_report"]

TINY = bench.BenchConfig(
    num_requests=7,
    prompt_len=(3, 20),
    output_len=(2, 9),
    output_median=4.0,
    batch_size=3,
    block_size=4,
    max_model_len=40,
    notes_max_len=64,
    system_prompt_tokens=30,
    num_questions=3,
    question_max_tokens=3,
)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=3)


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load_model(str(tiny_path), "ref")


@pytest.fixture(scope="module")
def corpus(loaded):
    return bench.corpus_token_ids(loaded.tokenizer, 100)


@pytest.fixture(scope="module")
def workload(corpus):
    return bench.make_workload(corpus, TINY)


@pytest.fixture(scope="module")
def modes(loaded, workload):
    return bench.run_batching(loaded, workload, TINY)


# ---------------------------------------------------------------------------------- _report
def test_write_section_creates_replaces_and_keeps_others(tmp_path):
    path = tmp_path / "B.md"
    report.write_section("alpha", "first A", path)
    report.write_section("beta", "only B", path)
    report.write_section("alpha", "second A\n\nwith two paragraphs", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "first A" not in text and "second A\n\nwith two paragraphs" in text and "only B" in text
    assert text.count("<!-- begin:alpha -->") == 1 and text.count("<!-- end:alpha -->") == 1
    assert text.index("<!-- end:alpha -->") < text.index("<!-- begin:beta -->")  # order kept


def test_write_section_rejects_bad_names_and_broken_markers(tmp_path):
    with pytest.raises(ValueError, match="section name"):
        report.write_section("Bad Name", "x", tmp_path / "B.md")
    broken = tmp_path / "broken.md"
    broken.write_text("<!-- begin:alpha -->\nno end\n")
    with pytest.raises(ValueError, match="unbalanced"):
        report.write_section("alpha", "x", broken)


def test_header_and_table():
    header = report.run_header(backend="ref", model="m", threads=3, command="python x.py")
    assert "torch threads used: 3" in header and "`ref`" in header and "python x.py" in header
    assert report.cpu_model() and report.git_commit()
    assert report.markdown_table(["a", "b"], [[1, 2]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
    ]
    with pytest.raises(ValueError, match="cells"):
        report.markdown_table(["a", "b"], [[1]])


# ---------------------------------------------------------------------------------- workload
def test_config_is_validated():
    with pytest.raises(ValueError, match="max_model_len"):
        dataclasses.replace(TINY, max_model_len=10)
    with pytest.raises(ValueError, match="prompt_len"):
        dataclasses.replace(TINY, prompt_len=(5, 2))
    with pytest.raises(ValueError, match="output_median"):
        dataclasses.replace(TINY, output_median=0)


def test_workload_is_deterministic_windows_of_the_corpus(corpus, workload):
    again = bench.make_workload(corpus, TINY)
    assert [(r.prompt_ids, r.max_tokens) for r in again] == [
        (r.prompt_ids, r.max_tokens) for r in workload
    ]
    text = "," + ",".join(map(str, corpus)) + ","
    for r in workload:
        assert TINY.prompt_len[0] <= len(r.prompt_ids) <= TINY.prompt_len[1]
        assert TINY.output_len[0] <= r.max_tokens <= TINY.output_len[1]
        assert "," + ",".join(map(str, r.prompt_ids)) + "," in text
    assert len({len(r.prompt_ids) for r in workload}) > 1  # lengths really vary
    assert len({r.max_tokens for r in workload}) > 1


# ---------------------------------------------------------------------------------- batching
def test_modes_produce_the_reference_greedy_outputs(tiny_path, workload, modes):
    llm = LLM(str(tiny_path), backend="ref", max_num_seqs=1, enable_prefix_caching=False)
    reference = [
        o.outputs[0].token_ids
        for o in llm.generate([r.prompt_ids for r in workload], [r.params() for r in workload])
    ]
    for m in modes:
        assert [m.outputs[r.request_id].outputs[0].token_ids for r in workload] == reference
        assert m.output_tokens == sum(r.max_tokens for r in workload)
    # the first three caches are sized for max_num_seqs full-length requests
    assert [m.preemptions for m in modes[:3]] == [0, 0, 0]


def test_same_memory_run_is_uncapped_within_static_memory(modes):
    mem = modes[3]
    assert mem.max_num_seqs == TINY.num_requests
    assert bench.same_memory_blocks(TINY) == TINY.batch_size * TINY.max_model_len // TINY.block_size
    # paging fits more requests than static batching's B into the same memory
    assert max(s.running for s in mem.waste) > TINY.batch_size
    assert all(s.paged_allocated <= bench.same_memory_blocks(TINY) * TINY.block_size
               for s in mem.waste)  # fmt: skip


def test_mode_step_counts(workload, modes):
    one, static, cont, mem = modes
    # one at a time: a step per output token (the prompt's step samples the first one)
    assert one.steps == sum(r.max_tokens for r in workload)
    # static: each group takes as many steps as its longest request
    groups = [workload[i : i + TINY.batch_size] for i in range(0, len(workload), TINY.batch_size)]
    assert static.steps == sum(max(r.max_tokens for r in g) for g in groups)
    assert mem.steps <= cont.steps <= static.steps


def test_ttft_and_latency_are_consistent(modes):
    for m in modes:
        for o in m.outputs.values():
            assert 0 < o.metrics.ttft <= o.metrics.finished_time - o.metrics.arrival_time
        assert m.mean_ttft <= m.mean_latency <= m.wall_s


def test_waste_probe_matches_block_tables(loaded, workload):
    engine = bench.make_engine(
        loaded,
        block_size=TINY.block_size,
        max_model_len=TINY.max_model_len,
        max_num_seqs=TINY.batch_size,
    )
    by_id = {r.request_id: r for r in workload}
    for r in workload:
        engine.add_request(r.request_id, r.prompt_ids, r.params())
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        if not running:
            continue
        sample = bench.measure_waste(engine, by_id, TINY)
        allocated = sum(len(s.block_table) * TINY.block_size for s in running)
        used = sum(s.num_computed_tokens for s in running)
        assert sample.paged_allocated == allocated  # no prompt shares a block here
        assert sample.paged_allocated - sample.used == allocated - used
        assert sample.used == sample.used_per_request == used
        assert sample.reserved_exact == sum(
            len(by_id[s.request_id].prompt_ids) + by_id[s.request_id].max_tokens for s in running
        )
        assert sample.reserved_max_len == len(running) * TINY.max_model_len
        # a table never holds a block more than needed: waste < one block per sequence
        assert allocated - used < len(running) * TINY.block_size
        checked += 1
    assert checked > 5


def test_waste_summary_orders_the_policies(modes):
    samples = modes[3].waste
    assert len(samples) >= modes[3].steps - 1
    w = bench.waste_summary(samples)
    assert 0 <= w["paged"] < 1 and 0 <= w["exact"] <= w["max_len"] < w["notes"] < 1
    with pytest.raises(ValueError, match="no waste samples"):
        bench.waste_summary([])


# ---------------------------------------------------------------------------------- prefix
def test_prefix_cache_counters_are_consistent(loaded, corpus):
    p = bench.run_prefix_cache(loaded, corpus, TINY)
    bs = TINY.block_size
    assert p.shared_prefix_tokens >= TINY.system_prompt_tokens
    # a hit reuses every full block of the shared prefix (the last prompt token is recomputed)
    assert p.cached_tokens == [
        min(p.shared_prefix_tokens, n - 1) // bs * bs for n in p.prompt_tokens[1:]
    ]
    assert p.hits == sum(p.cached_tokens)
    assert p.queries == sum(p.prompt_tokens)  # the prime request and the measured ones
    assert p.same_outputs == TINY.num_questions
    assert len(p.ttft_off) == len(p.ttft_hit) == TINY.num_questions


def test_main_quick_writes_its_section(tiny_path, tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    bench.main(
        ["--quick", "--threads", "1", "--model", str(tiny_path), "--write", "--output", str(out)]
    )
    text = out.read_text()
    assert "<!-- begin:batching -->" in text and "torch threads used: 1" in text
    for heading in ("Throughput and latency", "memory waste", "Prefix caching"):
        assert heading in text
    assert "identical in all four modes: 12/12" in text
    assert "wrote" in capsys.readouterr().out


def test_main_rejects_bad_threads():
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0"])


def test_request_params_are_greedy_and_fixed_length(workload):
    p = workload[0].params()
    assert isinstance(p, SamplingParams) and p.temperature == 0 and p.ignore_eos
