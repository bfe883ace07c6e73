"""`minillm bench`: its statistics against numpy, and its counts against the server's own.

The load generator runs against a live minillm server (tiny model); the tokens it says it
received must equal what the engine's Prometheus counter says it generated.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from minillm import LLM
from minillm.bench import BenchConfig, bench, format_report, percentile
from minillm.cli import main
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=17)
    llm = LLM(str(path), backend="ref", block_size=4, kv_cache_memory="4MiB")
    with run_in_thread(
        build_app(llm, served_model_name="tiny", api_key="k"), port=free_port()
    ) as srv:
        srv.llm = llm
        yield srv


def generated_total(server) -> float:
    return float(server.llm.engine.stats.generation_tokens)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_config_checks_its_values():
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(base_url="http://x", model="m", concurrency=0)
    with pytest.raises(ValueError, match="endpoint"):
        BenchConfig(base_url="http://x", model="m", endpoint="/v1/embeddings")
    with pytest.raises(ValueError, match="base_url"):
        BenchConfig(base_url="localhost:8000", model="m")


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_counts_what_the_server_generated(server, endpoint):
    before = generated_total(server)
    cfg = BenchConfig(
        base_url=server.url,
        model="tiny",
        concurrency=4,
        num_requests=10,
        max_tokens=6,
        prompt_len=12,
        endpoint=endpoint,
        api_key="k",
        ignore_eos=True,
    )
    report = bench(cfg)
    s = report.summary()
    assert s["completed"] == 10 and s["failed"] == 0
    assert s["output_tokens"] == 60 == generated_total(server) - before
    assert s["prompt_tokens"] > 0
    for r in report.completed:
        assert 0 < r.ttft <= r.latency
        assert r.output_tokens == 6 and r.tpot is not None and r.tpot > 0
        assert all(g >= 0 for g in r.itl)
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= max(r.latency for r in report.completed)
    assert s["output_throughput"] == pytest.approx(60 / report.duration)
    assert s["request_throughput"] == pytest.approx(10 / report.duration)
    text = format_report(report)
    assert "Successful requests" in text and "TTFT" in text and "P99" in text


def test_failures_are_recorded_not_raised(server):
    report = bench(
        BenchConfig(base_url=server.url, model="no-such-model", num_requests=3, api_key="k")
    )
    s = report.summary()
    assert s["completed"] == 0 and s["failed"] == 3
    assert any("HTTP 404" in e and "does not exist" in e for e in s["errors"])


def test_cli_bench_prints_the_table_and_writes_json(server, tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--base-url",
            server.url,
            "--api-key",
            "k",
            "--concurrency",
            "2",
            "--num-requests",
            "4",
            "--max-tokens",
            "3",
            "--ignore-eos",
            "--json",
            str(out_file),
        ]
    )  # no --model: the first one /v1/models lists
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Concurrency" in printed
    data = json.loads(out_file.read_text())
    assert data["config"]["model"] == "tiny" and data["summary"]["output_tokens"] == 12
