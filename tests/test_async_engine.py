"""AsyncLLMEngine: concurrent clients batch together, bad input fails alone, leaving aborts."""

from __future__ import annotations

import asyncio

import pytest

from minillm import LLM, SamplingParams
from minillm.engine.async_engine import AsyncLLMEngine
from minillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=2)
    return LLM(str(path), backend="ref", block_size=4)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def collect(aeng: AsyncLLMEngine, prompt, params) -> list:
    return [out async for out in aeng.generate(prompt, params)]


def test_concurrent_clients_get_their_solo_answers_and_share_steps(llm):
    prompts = [[5 + i, 6, 7 + 2 * i, 8] * (1 + i % 3) for i in range(8)]
    solo = [
        o.outputs[0].token_ids for o in llm.generate(prompts, [greedy(6 + i) for i in range(8)])
    ]
    aeng = AsyncLLMEngine(llm.engine)
    batch_sizes = []
    orig_step = llm.engine.step

    def spy():
        out = orig_step()
        batch_sizes.append(len(llm.engine.last_scheduled.seqs))
        return out

    llm.engine.step = spy
    try:

        async def main():
            return await asyncio.gather(
                *(collect(aeng, p, greedy(6 + i)) for i, p in enumerate(prompts))
            )

        streams = asyncio.run(main())
    finally:
        llm.engine.step = orig_step
        aeng.shutdown()
    assert [s[-1].outputs[0].token_ids for s in streams] == solo
    assert all(s[-1].finished for s in streams)
    assert max(batch_sizes) > 1  # clients really shared steps
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_request_fails_alone(llm):
    aeng = AsyncLLMEngine(llm.engine)

    async def main():
        bad = collect(aeng, [], greedy(3))
        good = collect(aeng, [5, 6, 7], greedy(3))
        return await asyncio.gather(bad, good, return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert isinstance(bad, ValueError) and "empty" in str(bad)
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 3


def test_client_that_leaves_aborts_and_frees_blocks(llm):
    aeng = AsyncLLMEngine(llm.engine)

    async def main():
        agen = aeng.generate([5, 6, 7, 8, 9], greedy(500))
        first = await agen.__anext__()
        await agen.aclose()  # the client disconnects mid-stream
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not llm.engine.has_unfinished_requests():
                break
        return first

    try:
        first = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert not first.finished
    assert not llm.engine.has_unfinished_requests()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_step_error_fails_in_flight_and_loop_survives(llm):
    aeng = AsyncLLMEngine(llm.engine)
    orig = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return orig(sched)

    llm.engine.runner.execute = flaky
    try:

        async def main():
            first = await asyncio.gather(collect(aeng, [5, 6], greedy(3)), return_exceptions=True)
            second = await collect(aeng, [5, 6], greedy(3))
            return first[0], second

        err, ok = asyncio.run(main())
    finally:
        llm.engine.runner.execute = orig
        aeng.shutdown()
    assert isinstance(err, RuntimeError) and "boom" in str(err)
    assert ok[-1].finished and aeng.errors == 1
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
