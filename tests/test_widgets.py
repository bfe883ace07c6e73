"""minillm.ui.widgets: the block-table view and the scheduler timeline report what the block
manager and the engine really did (checked against block tables, ref counts, outputs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

os.environ.setdefault("MPLCONFIGDIR", "/tmp/mpl")
import matplotlib  # noqa: E402

matplotlib.use("Agg")

from minillm import LLM, SamplingParams  # noqa: E402
from minillm.kv.block_manager import BlockManager  # noqa: E402
from minillm.testing import make_tiny_model  # noqa: E402
from minillm.ui import widgets as W  # noqa: E402


@dataclass(eq=False)
class Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


def admit(bm: BlockManager, seq: Seq) -> None:
    cached = bm.find_cached_blocks(seq)
    n = len(seq.token_ids) - len(cached) * bm.block_size
    bm.allocate(seq, cached, n)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_full_blocks(seq)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prompt(i: int) -> list[int]:
    return [(7 * i + 3 * j) % 300 + 5 for j in range(3 + (5 * i) % 23)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=2)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("backend", "ref")
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 64)  # small, so per-step snapshots stay cheap
    return LLM(str(path), **kw)


def requests(k: int, arrival_every: int = 0) -> list[W.TimelineRequest]:
    return [
        W.TimelineRequest(f"r{i}", prompt(i), greedy(2 + (3 * i) % 7), arrival_every * i)
        for i in range(k)
    ]


@pytest.fixture(scope="module")
def reference(tiny_path):
    """Every prompt generated alone: what any schedule must reproduce."""
    llm = make_llm(tiny_path, max_num_seqs=1, enable_prefix_caching=False)
    reqs = requests(10)
    return {r.request_id: llm.generate([r.prompt], r.params)[0].outputs[0].token_ids for r in reqs}


# ================================================================================ block view
def test_block_view_owners_fill_and_states_follow_the_block_manager():
    bm = BlockManager(num_blocks=12, block_size=4)
    a, b = Seq(list(range(10))), Seq(list(range(10)) + [99, 98])  # b hits a's two full blocks
    c, e = Seq([50, 51, 52, 53, 54]), Seq(list(range(200, 208)))
    for s in (a, b, c, e):
        admit(bm, s)
    d = Seq([])
    bm.fork(c, d)  # d shares both of c's blocks
    bm.free_blocks(e)  # e's two full blocks go back to the free list, still hittable
    live = {"a": a, "b": b, "c": c, "d": d}
    view = W.block_view(bm, live)
    for blk in range(bm.num_blocks):
        holders = {name for name, s in live.items() if blk in s.block_table}
        assert set(view.owners[blk]) == holders
        expected = (
            "shared"
            if bm.ref_counts[blk] > 1
            else "used"
            if bm.ref_counts[blk]
            else "cached"
            if bm.block_hash[blk] is not None
            else "free"
        )
        assert view.states[blk] == expected
    assert view.tables == {name: tuple(s.block_table) for name, s in live.items()}
    assert [view.count(k) for k in ("shared", "used", "cached", "free")] == [4, 2, 2, 4]
    # every physical slot is counted once, however many tables hold it
    distinct = {blk for s in live.values() for blk in s.block_table}
    assert view.allocated_slots == 4 * len(distinct) == 24
    assert view.used_slots == 8 + 2 + 4 + 5  # a/b's shared 8, a's last 2, b's last 4, c's 5
    assert view.wasted_slots == view.allocated_slots - view.used_slots == 24 - 19
    assert view.waste == pytest.approx(5 / 24)


def test_block_view_rejects_bad_input():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Seq([1, 2, 3])
    admit(bm, s)
    with pytest.raises(ValueError, match="label"):
        W.block_view(bm, [("x", s), ("x", s)])
    with pytest.raises(ValueError, match="outside"):
        W.block_view(bm, {"bad": Seq([1], 1, [7])})


def test_engine_block_view_mid_run(tiny_path):
    llm = make_llm(tiny_path, max_num_seqs=4)
    eng = llm.engine
    eng.add_request("a", prompt(3), greedy(6))
    eng.add_request("n", prompt(5), greedy(4, n=2))  # forks after its prompt: shared blocks
    eng.step()
    eng.add_request("b", prompt(3)[:8] + [7, 8, 9], greedy(6))  # hits a's first two blocks
    for _ in range(2):
        eng.step()
    view = W.engine_block_view(eng)
    running = {W.seq_label(s): s for s in eng.scheduler.running}
    assert set(view.tables) == set(running) == {"a", "b", "n/0", "n/1"}
    for blk in range(eng.block_manager.num_blocks):
        assert len(view.owners[blk]) == eng.block_manager.ref_counts[blk]
        for label in view.owners[blk]:
            assert blk in running[label].block_table
    assert view.count("shared") >= 3
    allocated = {blk for s in running.values() for blk in s.block_table}
    assert view.allocated_slots == 4 * len(allocated)
    eng.block_manager.check_invariants(list(running.values()))


def test_render_blocks_cuts_a_big_cache():
    bm = BlockManager(num_blocks=5000, block_size=4)
    s = Seq(list(range(400)))  # 100 blocks
    admit(bm, s)
    view = W.block_view(bm, {"s": s})
    fig = W.render_blocks(view, cols=16)
    assert len(fig.axes[0].patches) == 112  # whole rows up to the last held block
    assert "first 112 shown" in fig.axes[0].get_title()
    assert len(W.render_blocks(view, max_blocks=2000).axes[0].patches) == 1024 + 976
    with pytest.raises(ValueError, match="max_blocks"):
        W.render_blocks(view, max_blocks=0)


def test_render_blocks_draws_one_cell_per_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = Seq(list(range(7)))
    admit(bm, s)
    fig = W.render_blocks(W.block_view(bm, {"s": s}), cols=5)
    ax = fig.axes[0]
    assert len(ax.patches) == 10
    assert "waste" in ax.get_title()
    with pytest.raises(ValueError, match="cols"):
        W.render_blocks(W.block_view(bm, {"s": s}), cols=0)


# ================================================================================ timeline
def test_continuous_timeline_accounts_for_every_token(tiny_path, reference):
    llm = make_llm(
        tiny_path, max_num_seqs=3, max_num_batched_tokens=16, enable_prefix_caching=False
    )
    reqs = requests(8, arrival_every=2)
    tl = W.record_timeline(llm.engine, reqs, snapshot_blocks=True)
    assert tl.labels == [r.request_id for r in reqs]
    assert len(tl.blocks) == tl.num_steps == len(tl.step_seconds)
    for r in reqs:
        out = tl.outputs[r.request_id].outputs[0].token_ids
        assert out == reference[r.request_id]
        assert tl.sampled(r.request_id) == len(out)
        assert tl.tokens(r.request_id, "prefill") == len(r.prompt)  # no cache, no preemption
        assert tl.tokens(r.request_id, "decode") == len(out) - 1
        assert all(e.step >= r.arrival_step for e in tl.events_of(r.request_id))
        computing = [e for e in tl.events_of(r.request_id) if e.num_tokens]
        positions = [p for e in computing for p in range(e.start, e.start + e.num_tokens)]
        assert positions == list(range(len(r.prompt) + len(out) - 1))  # each once, in order
    for step in range(tl.num_steps):
        assert sum(e.num_tokens for e in tl.events if e.step == step) <= 16
        assert tl.batch_sizes()[step] <= 3
    grid = tl.grid()
    assert len(grid) == len(reqs) and all(len(row) == tl.num_steps for row in grid)
    assert sum(cell == "waiting" for row in grid for cell in row) > 0


def test_static_timeline_runs_groups_one_after_another(tiny_path, reference):
    reqs = requests(7)
    static = W.record_timeline(
        make_llm(tiny_path, max_num_seqs=3).engine, reqs, static_batch_size=3
    )
    cont = W.record_timeline(make_llm(tiny_path, max_num_seqs=3).engine, reqs)
    for tl in (static, cont):
        assert {k: v.outputs[0].token_ids for k, v in tl.outputs.items()} == reference_for(
            reference, reqs
        )
    work = [
        [e.step for r in reqs[i : i + 3] for e in static.events_of(r.request_id) if e.num_tokens]
        for i in range(0, 7, 3)
    ]
    for earlier, later in zip(work, work[1:], strict=False):
        assert max(earlier) < min(later)
    assert static.num_steps == sum(
        max(r.params.max_tokens for r in reqs[i : i + 3]) for i in range(0, 7, 3)
    )
    assert cont.num_steps < static.num_steps
    # everything arrived at step 0: the second group's TTFT includes the first group's run
    m = {k: v.metrics for k, v in static.outputs.items()}
    first, second = [r.request_id for r in reqs[:3]], [r.request_id for r in reqs[3:6]]
    assert min(m[r].ttft for r in second) > max(
        m[r].finished_time - m[r].arrival_time for r in first
    )
    # the queued static groups are shown waiting from the start
    assert [e.kind for e in static.events_of("r6")][0] == "waiting"


def reference_for(reference, reqs):
    return {r.request_id: reference[r.request_id] for r in reqs}


def test_preemption_and_recompute_are_recorded(tiny_path):
    llm = make_llm(tiny_path, num_kv_blocks=12, enable_prefix_caching=False)
    reqs = [W.TimelineRequest(f"r{i}", prompt(i), greedy(9)) for i in range(2, 8)]
    tl = W.record_timeline(llm.engine, reqs)
    kinds = [e.kind for e in tl.events]
    assert kinds.count("preempted") == llm.engine.scheduler.num_preemptions > 0
    for r in reqs:
        evs = tl.events_of(r.request_id)
        out = tl.outputs[r.request_id].outputs[0].token_ids
        assert tl.sampled(r.request_id) == len(out) == 9
        if any(e.kind == "preempted" for e in evs):
            first = next(i for i, e in enumerate(evs) if e.kind == "preempted")
            assert any(e.kind == "recompute" for e in evs[first:])
        # every position ends up computed, whatever was recomputed
        done = {p for e in evs for p in range(e.start, e.start + e.num_tokens)}
        assert done == set(range(len(r.prompt) + 8))
    llm.engine.block_manager.check_invariants([])


def test_parallel_sampling_rows(tiny_path):
    llm = make_llm(tiny_path)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    tl = W.record_timeline(llm.engine, [W.TimelineRequest("p", prompt(4), params)])
    assert tl.labels == ["p/0", "p/1", "p/2"]
    outs = tl.outputs["p"].outputs
    for i in range(3):
        assert tl.sampled(f"p/{i}") == len(outs[i].token_ids) == 4
    assert [e.kind for e in tl.events_of("p/1")][0] == "forked"


def test_describe_render_and_player(tiny_path):
    tl = W.record_timeline(
        make_llm(tiny_path, max_num_seqs=2, num_kv_blocks=24).engine,
        requests(3),
        snapshot_blocks=True,
    )
    text = W.describe_step(tl, 0)
    assert text.startswith("step 0: batch of 2 sequence(s)")
    assert "r0: prefill" in text and "r2: waiting" in text
    fig = W.render_timeline(tl)
    ax = fig.axes[0]
    rows = dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks(), strict=True))
    assert rows["r0"] > rows["r1"] > rows["r2"]  # first arrival on top
    fig = W.show_step(tl, 1)
    assert len(fig.axes[0].patches) == tl.blocks[1].num_blocks
    assert W.timeline_player(tl).children  # a slider and an output area
    with pytest.raises(ValueError, match="step"):
        W.describe_step(tl, tl.num_steps)


def test_record_timeline_rejects_bad_input(tiny_path):
    eng = make_llm(tiny_path).engine
    with pytest.raises(ValueError, match="static_batch_size"):
        W.record_timeline(eng, requests(2), static_batch_size=0)
    with pytest.raises(ValueError, match="unique"):
        W.record_timeline(eng, requests(2) + requests(1))
    eng.add_request("busy", [5, 6, 7], greedy(2))
    with pytest.raises(ValueError, match="idle"):
        W.record_timeline(eng, requests(1))
