"""The engine end to end on a tiny random model: batching, paging, preemption, prefix caching
and parallel sampling must never change what greedy decoding produces."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm import LLM, SamplingParams
from minillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=1)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("backend", "ref")
    kw.setdefault("block_size", 4)
    return LLM(str(path), **kw)


def prompts_ragged(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(3 + (5 * i) % 23)] for i in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def solo_outputs(tiny_path):
    """Each prompt generated alone: the reference every batched run must reproduce."""
    llm = make_llm(tiny_path, max_num_seqs=1, enable_prefix_caching=False)
    prompts = prompts_ragged(12)
    return prompts, [
        llm.generate([p], greedy(4 + i % 9))[0].outputs[0].token_ids for i, p in enumerate(prompts)
    ]


def run_all(llm: LLM, prompts, n_tokens=None):
    params = [greedy(4 + i % 9) for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_batched_equals_one_at_a_time(tiny_path, solo_outputs):
    prompts, expected = solo_outputs
    llm = make_llm(tiny_path, max_num_seqs=16)
    assert run_all(llm, prompts) == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_chunked_prefill_equals(tiny_path, solo_outputs):
    prompts, expected = solo_outputs
    llm = make_llm(tiny_path, max_num_batched_tokens=7)  # every long prompt is split in chunks
    assert run_all(llm, prompts) == expected


def test_preemption_equals(tiny_path, solo_outputs):
    prompts, expected = solo_outputs
    llm = make_llm(tiny_path, num_kv_blocks=14, enable_prefix_caching=False)
    assert run_all(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 14


def test_prefix_cache_hits_equal(tiny_path):
    shared = list(range(10, 30))
    prompts = [shared + [40 + i, 50 + i] for i in range(6)]
    cold = make_llm(tiny_path, enable_prefix_caching=False)
    warm = make_llm(tiny_path, enable_prefix_caching=True)
    expected = [o.outputs[0].token_ids for o in cold.generate(prompts, greedy(6))]
    first = warm.generate(prompts[:1], greedy(6))[0]
    rest = warm.generate(prompts[1:], greedy(6))
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == expected
    bm = warm.engine.block_manager
    assert bm.prefix_cache_hits >= 5 * 20 and all(o.metrics.num_cached_tokens == 20 for o in rest)


def test_parallel_sampling_shares_prompt_blocks(tiny_path):
    llm = make_llm(tiny_path)
    prompt = list(range(5, 19))  # 14 tokens: a shared partial last block -> copy-on-write
    one = llm.generate([prompt], greedy(5))[0].outputs[0].token_ids
    outs = llm.generate([prompt], greedy(5, n=3))[0].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(o.token_ids == one for o in outs)
    seeded = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = [o.token_ids for o in llm.generate([prompt], seeded)[0].outputs]
    b = [o.token_ids for o in llm.generate([prompt], seeded)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) > 1
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_abort_frees_blocks(tiny_path):
    llm = make_llm(tiny_path)
    eng = llm.engine
    eng.add_request("a", list(range(5, 30)), greedy(50))
    eng.add_request("b", list(range(5, 12)), greedy(50))
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    eng.abort_request("b")
    assert not eng.has_unfinished_requests() and not eng.scheduler.running
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_stop_conditions(tiny_path):
    llm = make_llm(tiny_path)
    base = llm.generate([[5, 6, 7]], greedy(12))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop_tok = base.token_ids[3]
    out = llm.generate([[5, 6, 7]], greedy(12, stop_token_ids=[stop_tok]))[0].outputs[0]
    k = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[: k + 1] and out.stop_reason == stop_tok
    text = base.text
    if len(text.strip()) >= 4:
        stop = text.strip()[1:3]
        out = llm.generate([[5, 6, 7]], greedy(12, stop=[stop]))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]


def test_bad_requests_raise_and_leave_engine_clean(tiny_path):
    llm = make_llm(tiny_path)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(2))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 10_000], greedy(2))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**9]], greedy(2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[5, 6]], greedy(2))[0].finished


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 11)),
        min_size=1,
        max_size=40,
    )
)
def test_random_interleavings_leak_nothing(tiny_path, solo_outputs, ops):
    prompts, expected = solo_outputs
    llm = make_llm(tiny_path, num_kv_blocks=16, max_num_batched_tokens=16)
    eng = llm.engine
    live: dict[str, int] = {}
    done: dict[str, list[int]] = {}
    for k, (op, i) in enumerate(ops):
        if op == "add":
            rid = f"r{k}"
            eng.add_request(rid, prompts[i], greedy(4 + i % 9))
            live[rid] = i
        elif op == "abort" and live:
            rid = sorted(live)[i % len(live)]
            eng.abort_request(rid)
            del live[rid]
        else:
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
                    del live[out.request_id]
        eng.block_manager.check_invariants(eng.scheduler.running)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
                del live[out.request_id]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    for rid, toks in done.items():
        i = int(rid[1:])
        assert toks == expected[ops[i][1]], "a finished request differs from its solo run"


def test_max_model_len_must_fit_in_the_cache(tiny_path):
    with pytest.raises(ValueError, match="KV slots"):
        make_llm(tiny_path, num_kv_blocks=4, max_model_len=100)
    llm = make_llm(tiny_path, num_kv_blocks=4)  # default max_model_len shrinks to the cache
    assert llm.engine.max_model_len == 16
    out = llm.generate([[5, 6, 7]], greedy(100))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 3
