"""Load: 64 concurrent streaming clients, clients that leave, and /metrics that add up.

Counts are checked three ways: the tokens each stream delivered (one logprobs entry per token),
the `usage` the server reported, and the engine's Prometheus counters.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from minillm import LLM
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model, slowed_steps

CLIENTS = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=11)
    return LLM(str(path), backend="ref", block_size=4, kv_cache_memory="2MiB", max_num_seqs=64)


@pytest.fixture(scope="module")
def server(llm, free_port):
    with run_in_thread(build_app(llm, served_model_name="tiny"), port=free_port()) as srv:
        yield srv


def scrape(url: str) -> dict[str, float]:
    """`/metrics` as {"name{labels}": value}, label order as exposed."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="tiny",?', "", key).replace("{}", "")] = float(value)
    return out


def wait_idle(llm: LLM, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not llm.engine.has_unfinished_requests()


def all_blocks_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks


def test_64_concurrent_streams_complete_and_their_counts_add_up(server, llm):
    before = scrape(server.url)
    batch_sizes = []
    real_step = llm.engine.step

    def spy():  # runs on the engine thread: record how many sequences each step carried
        out = real_step()
        batch_sizes.append(len(llm.engine.last_scheduled.seqs))
        return out

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
        stream = await client.chat.completions.create(
            model="tiny",
            max_tokens=4 + i % 9,
            temperature=0.8,
            seed=i,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"client {i} asks about batching"}],
        )
        streamed, usage, reason = 0, None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                streamed += len(c.logprobs.content) if c.logprobs else 0
                reason = c.finish_reason or reason
        return streamed, usage, reason

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))

    llm.engine.step = spy
    try:
        results = asyncio.run(main())
    finally:
        llm.engine.step = real_step
    assert len(results) == CLIENTS
    for i, (streamed, usage, reason) in enumerate(results):
        assert reason in ("stop", "length"), i
        assert streamed == usage and 1 <= usage <= 4 + i % 9, (i, streamed, usage)
    assert max(batch_sizes) >= 16  # the clients really were batched together
    wait_idle(llm)
    assert all_blocks_free(llm)

    after = scrape(server.url)
    generated = sum(u for _, u, _ in results)
    assert (
        after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == generated
    )
    finished = sum(
        after[f'vllm:request_success_total{{finished_reason="{r}"}}']
        - before[f'vllm:request_success_total{{finished_reason="{r}"}}']
        for r in ("stop", "length")
    )
    assert finished == CLIENTS
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        count = f"vllm:{name}_count"
        assert after[count] - before.get(count, 0) == CLIENTS, name
    gaps = after["vllm:inter_token_latency_seconds_count"] - before.get(
        "vllm:inter_token_latency_seconds_count", 0
    )
    assert gaps == generated - CLIENTS  # every token after each request's first
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:prompt_tokens_total"] > before["vllm:prompt_tokens_total"]


@pytest.fixture
def slow_engine(llm):
    """Each engine step takes at least 10 ms, so a 200-token request outlives the client."""
    with slowed_steps(llm.engine):
        yield


def test_a_client_that_disconnects_mid_stream_is_aborted(server, llm, slow_engine):
    aborted = scrape(server.url)['vllm:request_success_total{finished_reason="abort"}']
    body = {
        "model": "tiny",
        "prompt": "a long story",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break  # leave: closing the response closes the connection
        assert llm.engine.has_unfinished_requests()
    wait_idle(llm)
    assert all_blocks_free(llm)
    after = scrape(server.url)
    assert after['vllm:request_success_total{finished_reason="abort"}'] == aborted + 1


def test_a_non_streaming_client_that_gives_up_is_aborted(server, llm, slow_engine):
    before = scrape(server.url)
    body = {"model": "tiny", "prompt": "another long story", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    wait_idle(llm)
    assert all_blocks_free(llm)
    after = scrape(server.url)
    key = 'vllm:request_success_total{finished_reason="abort"}'
    assert after[key] == before[key] + 1
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 0 < generated < 200  # it was stopped part way, not run to the end
