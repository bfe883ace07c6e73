"""Context parallelism (minillm/parallel/ring_attention.py, cp.py): ring attention over 2 and 3
real processes equals torch's causal scaled_dot_product_attention (GQA, uneven lengths, both
layouts); a context-parallel prefill of a tiny Llama and of the bundled SmolLM2 gives the same
logits, K/V, greedy token and next decode step as one process; each rank sends exactly the K/V
bytes the formula says; bad sizes are refused before anything is spawned; a worker that dies
or fails is named in the error; no process and no process group outlives a call.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minillm.estimate import ModelSpec
from minillm.estimate_parallel import cp_bytes_per_prefill
from minillm.loader import load_model
from minillm.parallel.cp import (
    context_parallel_prefill,
    decode_step,
    expected_ring_bytes,
    prefill_one_process,
)
from minillm.parallel.ranks import run_on_ranks
from minillm.parallel.ring_attention import (
    RingStats,
    SeqLayout,
    attend_block,
    attend_pieces,
    merge_partials,
    ring_attention,
    ring_bytes_per_layer,
)
from minillm.testing import make_tiny_model, no_leftover_workers

TIMEOUT_S = 60.0  # bounds each point-to-point wait; a failure, never a pass, depends on it


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test must leave no worker and no process group behind."""
    with no_leftover_workers():
        yield


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's causal attention over the whole sequence: q (T, H, D), k/v (T, KvH, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


def _qkv(length: int, heads: int, kv_heads: int, dim: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(length * 100 + heads * 10 + kv_heads)
    return tuple(torch.randn(length, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))


# ------------------------------------------------------------------- the math, one process
def test_layouts_cover_the_sequence_once_and_zigzag_pairs_early_with_late() -> None:
    for length, world in [(7, 2), (23, 3), (3, 3), (5, 3), (64, 4)]:
        for kind in ("zigzag", "contiguous"):
            layout = SeqLayout(length, world, kind)
            every = torch.cat([layout.positions(r) for r in range(world)])
            assert sorted(every.tolist()) == list(range(length))
            assert sum(layout.size(r) for r in range(world)) == length
            assert max(layout.size(r) for r in range(world)) - min(
                layout.size(r) for r in range(world)
            ) <= (2 if kind == "zigzag" else 1)
    z = SeqLayout(16, 2, "zigzag")
    assert z.segments(0) == [(0, 4), (12, 16)] and z.segments(1) == [(4, 8), (8, 12)]
    assert z.owner_of_last() == (0, 7)
    assert SeqLayout(16, 2, "contiguous").owner_of_last() == (1, 7)


def test_partial_attentions_over_disjoint_keys_merge_to_the_full_attention() -> None:
    """The online-softmax merge is exact, in any order, and a block a row cannot see
    (lse -inf) changes nothing."""
    q, k, v = _qkv(12, 6, 2)
    full, _ = attend_block(q, k, v, 0.3, None)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    parts = [perm[:5], perm[5:9], perm[9:]]
    out = torch.zeros_like(full)
    lse = torch.full(full.shape[:2], float("-inf"))
    for idx in reversed(parts):
        o, s = attend_block(q, k[idx], v[idx], 0.3, None)
        out, lse = merge_partials(out, lse, o, s)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    blind = torch.zeros(12, 4, dtype=torch.bool)
    o, s = attend_block(q, k[:4], v[:4], 0.3, blind)
    assert torch.isinf(s).all() and not o.abs().any()
    again, _ = merge_partials(out, lse, o, s)
    torch.testing.assert_close(again, out)


def test_one_rank_ring_is_plain_causal_attention() -> None:
    q, k, v = _qkv(9, 4, 2)
    for kind in ("zigzag", "contiguous"):
        layout = SeqLayout(9, 1, kind)
        pos = layout.positions(0)
        out = ring_attention(q[pos], k[pos], v[pos], layout, 0, 8**-0.5)
        torch.testing.assert_close(out, _reference(q, k, v)[pos], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- the ring, N processes
def _prepare_ring(rank: int, world: int, length: int, heads: int, kv_heads: int, kind: str):
    """Every rank draws the same q/k/v (same seed) and keeps its own tokens."""
    layout = SeqLayout(length, world, kind)
    pos = layout.positions(rank)
    q, k, v = _qkv(length, heads, kv_heads)
    return rank, layout, q[pos], k[pos], v[pos]


def _run_ring(state: tuple) -> tuple[torch.Tensor, RingStats]:
    rank, layout, q, k, v = state
    stats = RingStats()
    out = q.new_zeros(0)
    for _ in range(2):  # two "layers": the ring must be reusable call after call
        out = ring_attention(q, k, v, layout, rank, q.shape[-1] ** -0.5, stats)
    return out, stats


@pytest.mark.parametrize(
    "world,length,heads,kv_heads,kind",
    [
        (2, 16, 4, 2, "zigzag"),  # GQA, even
        (2, 7, 4, 4, "contiguous"),  # MHA, uneven
        (3, 23, 6, 2, "zigzag"),  # GQA, uneven, 6 chunks of 4 or 3
        (3, 20, 6, 3, "contiguous"),  # GQA, uneven
    ],
)
def test_ring_attention_equals_causal_sdpa(
    world: int, length: int, heads: int, kv_heads: int, kind: str
) -> None:
    args = (length, heads, kv_heads, kind)
    results = run_on_ranks(
        world, _prepare_ring(0, world, *args), _prepare_ring, args, _run_ring, (), TIMEOUT_S
    )
    layout = SeqLayout(length, world, kind)
    q, k, v = _qkv(length, heads, kv_heads)
    want = _reference(q, k, v)
    got = torch.empty_like(want)
    for rank, (out, _) in enumerate(results):
        got[layout.positions(rank)] = out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for rank, (_, stats) in enumerate(results):
        per_layer = ring_bytes_per_layer(layout, rank, kv_heads, 8)
        assert stats.per_call_bytes == [per_layer, per_layer]
        assert stats.messages == 2 * (world - 1)
    if kind == "zigzag" and length % (2 * world) == 0:  # equal chunks: equal causal work
        assert len({stats.scores for _, stats in results}) == 1


def test_zigzag_balances_the_causal_work_that_contiguous_piles_on_the_last_rank() -> None:
    """Counted, not timed: the (query, key) scores each rank computes (one process plays all
    ranks' arithmetic; the ring's transport is tested above)."""

    def work(kind: str, world: int, length: int) -> list[int]:
        layout = SeqLayout(length, world, kind)
        q, k, v = _qkv(length, 2, 2)
        counts = []
        for rank in range(world):
            stats = RingStats()
            pos = layout.positions(rank)
            out = torch.zeros(len(pos), 2, 8)
            lse = torch.full((len(pos), 2), float("-inf"))
            for src in range(world):
                sp = layout.positions(src)
                kv = torch.stack((k[sp], v[sp]))
                attend_pieces(q[pos], layout.segments(rank), kv, layout.segments(src), 1.0,
                               out, lse, stats)  # fmt: skip
            counts.append(stats.scores)
        return counts

    contiguous, zigzag = work("contiguous", 4, 64), work("zigzag", 4, 64)
    assert contiguous == sorted(contiguous) and contiguous[-1] > 3 * contiguous[0]
    assert max(zigzag) == min(zigzag) < max(contiguous)


# ------------------------------------------------------------------- a real model's prefill
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cp") / "llama", "llama", seed=0)


def _check_against_one_process(path: Path, ids: list[int], world: int, kind: str, atol: float):
    loaded = load_model(path, "ref")
    want_logits, want_kv = prefill_one_process(loaded.model, ids)
    got = context_parallel_prefill(path, ids, world, backend="ref", layout=kind,
                                   timeout_s=TIMEOUT_S)  # fmt: skip
    torch.testing.assert_close(got.logits, want_logits, rtol=1e-4, atol=atol)
    assert int(got.logits.argmax()) == int(want_logits.argmax())
    assert len(got.kv) == len(want_kv) == loaded.config.num_layers
    for (k, v), (wk, wv) in zip(got.kv, want_kv, strict=True):
        torch.testing.assert_close(k, wk, rtol=1e-4, atol=atol)
        torch.testing.assert_close(v, wv, rtol=1e-4, atol=atol)
    # decode goes on in one process from the gathered K/V, as from its own prefill
    token = int(want_logits.argmax())
    after_cp = decode_step(loaded.model, got.kv, token)
    after_one = decode_step(loaded.model, want_kv, token)
    torch.testing.assert_close(after_cp, after_one, rtol=1e-4, atol=atol)
    assert int(after_cp.argmax()) == int(after_one.argmax())
    # each rank sent exactly the K/V blocks it forwards, layer after layer
    cfg = loaded.config
    want_bytes = expected_ring_bytes(got.layout, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    assert got.bytes_sent == want_bytes
    assert [r.traffic.get("cp_ring", 0) for r in got.reports] == want_bytes
    # all ranks together: (N-1) x the prompt's K/V, the estimator's formula (fp32 here)
    spec = ModelSpec.from_config(cfg)
    assert sum(got.bytes_sent) == cp_bytes_per_prefill(spec, world, len(ids), 4)
    assert [r.tokens for r in got.reports] == [got.layout.size(r) for r in range(world)]
    return got


@pytest.mark.parametrize("world,length,kind", [(2, 40, "zigzag"), (3, 29, "contiguous")])
def test_cp_prefill_of_a_tiny_llama_equals_one_process(
    tiny: Path, world: int, length: int, kind: str
) -> None:
    ids = [(7 * i + 3) % 300 for i in range(length)]
    got = _check_against_one_process(tiny, ids, world, kind, atol=1e-4)
    if length % world == 0:  # equal chunks: layers x (N-1) x one chunk's K/V bytes
        chunk_kv_bytes = 2 * (length // world) * 2 * 16 * 4  # K and V x c x KvH 2 x D 16 x fp32
        assert got.bytes_sent == [2 * (world - 1) * chunk_kv_bytes] * world


def test_cp_prefill_of_smollm2_equals_one_process(bundled_gguf_path: Path) -> None:
    loaded = load_model(bundled_gguf_path, "ref")
    text = "Context parallelism splits one long prompt over several processes. " * 30
    ids = loaded.tokenizer.encode(text)[:200]
    assert len(ids) == 200
    got = _check_against_one_process(bundled_gguf_path, ids, 2, "zigzag", atol=2e-3)
    # SmolLM2: 30 layers, 3 KV heads of 64; each rank forwards its 100-token chunk per layer
    assert got.bytes_sent == [30 * 1 * 100 * 2 * 3 * 64 * 4] * 2


# ------------------------------------------------------------------- bad input, failures
@pytest.mark.parametrize(
    "world,ids,match",
    [
        (0, [1, 2, 3], "world_size must be an integer >= 1"),
        (-2, [1, 2, 3], "world_size must be an integer >= 1"),
        (2.0, [1, 2, 3], "world_size must be an integer >= 1"),
        (4, [1, 2, 3], "3-token sequence cannot be split over 4"),
        (1, [], "the sequence is empty"),
        (2, [1, 10**6], "outside the vocabulary"),
    ],
)
def test_bad_sizes_and_ids_are_refused_before_any_worker_starts(
    tiny: Path, world: object, ids: list[int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        context_parallel_prefill(tiny, ids, world)  # type: ignore[arg-type]


def test_unknown_layout_and_device_backend_are_refused(tiny: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout 'stripes'"):
        context_parallel_prefill(tiny, [1, 2, 3, 4], 2, layout="stripes")
    with pytest.raises(ValueError, match="host backends"):
        context_parallel_prefill(tiny, [1, 2, 3, 4], 2, backend="cuda")


def _prepare_plain(rank: int, world: int, fail_in_prepare: bool) -> int:
    if fail_in_prepare and rank == 1:
        raise ValueError("rank 1 could not load its weights")
    return rank


def _run_recv_from_1(rank: int, fail_in_prepare: bool) -> int:
    """Rank 0 waits for rank 1, which dies (SIGKILL) or raises instead of sending."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 2:
        raise RuntimeError("rank 2 broke in the middle of its run")
    t = torch.empty(4)
    dist.recv(t, 1)
    return rank


def test_a_worker_failing_to_prepare_is_reported_with_its_traceback() -> None:
    with pytest.raises(RuntimeError, match="could not load its weights") as err:
        run_on_ranks(2, 0, _prepare_plain, (True,), _run_recv_from_1, (True,), TIMEOUT_S)
    assert "rank 1" in str(err.value)


def test_a_worker_killed_during_the_run_is_named_and_nothing_hangs() -> None:
    with pytest.raises(RuntimeError) as err:
        run_on_ranks(3, 0, _prepare_plain, (False,), _run_recv_from_1, (False,), TIMEOUT_S)
    text = str(err.value)
    assert "rank 1 (pid" in text and "SIGKILL" in text
