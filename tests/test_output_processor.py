"""One output processor: the kinds of output (cumulative, delta, final only) tell one story, and
the scheduler's per-step bookkeeping (forks, appends, token stops) keeps the block books."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from minillm import LLM, SamplingParams
from minillm.engine.async_engine import AsyncLLMEngine
from minillm.engine.scheduler import SampledToken, Scheduler, SchedulerConfig
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.kv.block_manager import BlockManager
from minillm.model.pooling import embed
from minillm.sampling import RequestOutputKind
from minillm.testing import make_tiny_model

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=3)
    return LLM(str(path), backend="ref", block_size=4)


def run(llm: LLM, params: SamplingParams, rid: str) -> list:
    """Every output the engine yields for one request, in order."""
    llm.engine.add_request(rid, PROMPT, params)
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += [o for o in llm.engine.step() if o.request_id == rid]
    return outs


def stop_inside(llm: LLM) -> str:
    """A stop string the tiny model's greedy answer really reaches, several tokens long (so a
    stream must hold back its first characters until it knows they are not the answer's)."""
    text = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))[0]
    answer, ids = text.outputs[0].text, text.outputs[0].token_ids
    span = llm.tokenizer.decode(ids[6:9])
    assert len(span) >= 3 and span in answer, (answer, span)
    return span


CASES = {
    "greedy": dict(temperature=0, max_tokens=9, ignore_eos=True),
    "seeded n=3 with logprobs": dict(
        temperature=1.0, seed=11, n=3, max_tokens=6, ignore_eos=True, logprobs=2
    ),
}


@pytest.mark.parametrize("case", [*CASES, "stop string"])
def test_delta_outputs_add_up_to_the_cumulative_ones(llm, case):
    kwargs = CASES.get(case) or dict(temperature=0, max_tokens=14, stop=[stop_inside(llm)])
    cumulative = run(llm, SamplingParams(**kwargs), f"c-{case}")
    deltas = run(llm, SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA), f"d-{case}")
    final = cumulative[-1]
    assert final.finished and deltas[-1].finished
    assert not any(o.finished for o in deltas[:-1])
    for c in final.outputs:
        parts = [p for o in deltas for p in o.outputs if p.index == c.index]
        assert "".join(p.text for p in parts) == c.text
        assert [t for p in parts for t in p.token_ids] == c.token_ids
        if c.logprobs is not None:
            assert [lp for p in parts for lp in p.logprobs] == c.logprobs
        assert [p.finish_reason for p in parts][-1] == c.finish_reason
        assert all(p.finish_reason is None for p in parts[:-1])  # it ends exactly once
        assert all(p.text or p.token_ids or p.finish_reason for p in parts)  # nothing empty
    if case == "stop string":
        (c,) = final.outputs
        assert c.finish_reason == "stop" and c.stop_reason == kwargs["stop"][0]
        assert kwargs["stop"][0] not in "".join(p.text for o in deltas for p in o.outputs)


def test_final_only_gives_one_output_equal_to_the_last_cumulative_one(llm):
    kwargs = CASES["seeded n=3 with logprobs"]
    cumulative = run(llm, SamplingParams(**kwargs), "c-final")
    final = run(llm, SamplingParams(**kwargs, output_kind="final_only"), "f-final")
    assert len(final) == 1 and final[0].finished
    times = final[0].metrics.token_times  # the first completion's tokens, as they came
    assert len(times) == len(final[0].outputs[0].token_ids) == kwargs["max_tokens"]
    assert times == sorted(times) and times[0] == final[0].metrics.first_token_time
    assert len(final[0].metrics.inter_token_latencies) == len(times) - 1
    assert [dataclasses.astuple(c) for c in final[0].outputs] == [
        dataclasses.astuple(c) for c in cumulative[-1].outputs
    ]


def test_output_kind_is_checked():
    with pytest.raises(ValueError, match="output_kind must be one of cumulative, delta"):
        SamplingParams(output_kind="sometimes")


def test_an_aborted_delta_stream_ends_with_an_empty_abort_delta(llm):
    params = SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    llm.engine.add_request("abort-me", PROMPT, params)
    sent = "".join(c.text for _ in range(3) for o in llm.engine.step() for c in o.outputs)
    last = llm.engine.abort_request("abort-me")
    assert last.finished and [c.finish_reason for c in last.outputs] == ["abort"]
    assert last.outputs[0].text == "" and sent  # nothing repeated, nothing lost
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# ---------------------------------------------------------------------------- the scheduler's books
def test_update_from_output_forks_appends_and_finishes_in_one_call():
    """Pure Python, no model: a 6-token prompt with n=3 on blocks of 4 slots."""
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(max_model_len=32), bm)
    params = SamplingParams(n=3, max_tokens=2, ignore_eos=True)
    parent = Sequence("r", list(range(6)), 6, params, eos_token_ids=frozenset({99}))
    sched.add(parent)
    batch = sched.schedule()
    assert batch.seqs == [parent] and batch.num_new_tokens == [6]
    sampled = [SampledToken(parent, 40 + i, -0.5, None, fork_index=i) for i in range(3)]
    seqs = sched.update_from_output(batch, sampled)
    assert [s.index for s in seqs] == [0, 1, 2] and sched.running == seqs
    assert [s.token_ids[6:] for s in seqs] == [[40], [41], [42]]
    assert all(s.num_computed_tokens == 6 and s.block_table == parent.block_table for s in seqs)
    assert [bm.ref_counts[b] for b in parent.block_table] == [3, 3]  # shared, not copied
    bm.check_invariants(seqs)
    # the next step: each sibling writes its own copy of the shared partial block, then stops
    batch = sched.schedule()
    assert len(batch.blocks_to_copy) == 2  # two of the three need a private last block
    done = sched.update_from_output(batch, [SampledToken(s, 50, -0.1) for s in seqs])
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in done)
    assert not sched.running and bm.num_free_blocks == bm.num_blocks


def test_eos_ends_a_sequence_only_after_min_tokens():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_model_len=16), bm)
    seq = Sequence("r", [1, 2], 2, SamplingParams(min_tokens=2), eos_token_ids=frozenset({7}))
    sched.add(seq)
    for expect in (SequenceStatus.RUNNING, SequenceStatus.FINISHED_STOPPED):
        sched.update_from_output(sched.schedule(), [SampledToken(seq, 7, 0.0)])
        assert seq.status is expect


# ---------------------------------------------------------------------------- the async engine
def test_embeddings_run_on_the_engine_thread(llm):
    aeng = AsyncLLMEngine(llm.engine)
    seen: list[str] = []
    real = llm.engine.embed

    def recording(inputs):
        seen.append(threading.current_thread().name)
        return real(inputs)

    llm.engine.embed = recording
    try:
        vectors = asyncio.run(aeng.embed([PROMPT, PROMPT[:3]]))
    finally:
        llm.engine.embed = real
        aeng.shutdown()
    assert seen == ["minillm-engine"]
    assert vectors == [embed(llm.engine.model, PROMPT), embed(llm.engine.model, PROMPT[:3])]


def test_shutdown_fails_requests_in_flight_instead_of_leaving_them_waiting(llm):
    aeng = AsyncLLMEngine(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    real_step, steps = llm.engine.step, []

    def step_then_hold():  # from the second step on, wait until shutdown was asked for
        if steps:
            assert aeng._stop.wait(60)
        steps.append(1)
        return real_step()

    llm.engine.step = step_then_hold

    async def main() -> BaseException | None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in aeng.generate(PROMPT, params):
                first.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(first.wait(), 60)
        await asyncio.to_thread(aeng.shutdown)
        try:
            await asyncio.wait_for(task, 60)
        except RuntimeError as e:
            return e
        return None

    try:
        error = asyncio.run(main())
    finally:
        llm.engine.step = real_step
    assert error is not None and "shut down" in str(error)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
