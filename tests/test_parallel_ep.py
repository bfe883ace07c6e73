"""Expert parallelism (parallel/ep_moe.py, ep_dispatch.py): an MoE layer whose experts are split
over 2 and 3 real processes gives one process's output and router counts; each rank sends
exactly the rows its routing implies; bad sizes are refused with the sizes that work; no
process is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.config import ModelConfig
from minillm.kernels import get_backend
from minillm.model.moe import ExpertCounts, MoEFeedForward
from minillm.model.weights import load_hf_weights
from minillm.parallel.ep_moe import (
    check_expert_parallel,
    expert_range,
    token_slice,
    valid_ep_sizes,
)
from minillm.parallel.ep_run import expert_parallel_layer
from minillm.testing import (
    make_tiny_model,
    make_tiny_moe_model,
    no_leftover_workers,
    spawned_children,
)

# 6 heads, 6 KV heads, 6 experts: splits over 2 and 3 ranks
SPLITS_2_AND_3 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    with no_leftover_workers():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ep-models")
    return {
        "mixtral": make_tiny_moe_model(
            root / "mixtral", "mixtral", 6, 2, seed=11, **SPLITS_2_AND_3
        ),
        "qwen2_moe": make_tiny_moe_model(
            root / "qwen2_moe", "qwen2_moe", 6, 2, seed=12, **SPLITS_2_AND_3
        ),
    }


def _one_process(path: Path, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ModelConfig.from_hf_config(path / "config.json")
    assert cfg.moe is not None
    counts = ExpertCounts([layer], cfg.moe.num_experts)
    lw = load_hf_weights(path, cfg).layers[layer]
    moe = MoEFeedForward(lw.moe, cfg.moe, get_backend("ref"), counts, 0)
    return moe(hidden), counts.counts[0]


@pytest.mark.parametrize(
    "arch,ranks,tokens", [("mixtral", 2, 37), ("qwen2_moe", 2, 9), ("mixtral", 3, 20)]
)
def test_expert_parallel_layer_matches_one_process(models, arch, ranks, tokens):
    path = models[arch]
    torch.manual_seed(ranks * 100 + tokens)
    hidden = torch.randn(tokens, 96)
    want, want_counts = _one_process(path, 1, hidden)
    results = expert_parallel_layer(path, 1, hidden, ranks)

    assert [r.experts for r in results] == [list(expert_range(6, r, ranks)) for r in range(ranks)]
    for r in results:
        torch.testing.assert_close(r.output, want, rtol=1e-5, atol=1e-5)
        assert r.counts.tolist() == want_counts.tolist()  # every rank sees the whole batch's
    assert int(want_counts.sum()) == tokens * 2  # tokens x top_k

    # exactly the rows the routing implies: in the dispatch rank r sends each pair of its
    # tokens whose expert lives elsewhere, d x 4 bytes each; in the combine it sends back the
    # outputs of the pairs other ranks sent to its experts
    cfg = ModelConfig.from_hf_config(path / "config.json")
    lw = load_hf_weights(path, cfg).layers[1]
    moe = MoEFeedForward(lw.moe, cfg.moe, get_backend("ref"))
    _, ids = moe.route(hidden)
    for rank, r in enumerate(results):
        lo, hi = token_slice(tokens, rank, ranks)
        owner = ids // (6 // ranks)  # (T, k): the rank holding each pair's expert
        source = (torch.arange(tokens) // -(-tokens // ranks))[:, None].expand_as(ids)
        sent = int(((source == rank) & (owner != rank)).sum())
        served = int(((source != rank) & (owner == rank)).sum())
        assert r.traffic["ep_dispatch"]["bytes"] == sent * 96 * 4
        assert r.traffic["ep_combine"]["bytes"] == served * 96 * 4
        assert r.traffic["ep_counts"]["bytes"] == 6 * 8


def test_fewer_tokens_than_ranks(models):
    """One token on 3 ranks: two ranks route nothing but still serve their experts."""
    hidden = torch.randn(1, 96)
    want, _ = _one_process(models["mixtral"], 0, hidden)
    for r in expert_parallel_layer(models["mixtral"], 0, hidden, 3):
        torch.testing.assert_close(r.output, want, rtol=1e-5, atol=1e-5)


def test_sizes_that_do_not_divide_are_refused_with_the_ones_that_do(models, tmp_path):
    cfg = ModelConfig.from_hf_config(models["mixtral"] / "config.json")
    assert valid_ep_sizes(cfg) == [1, 2, 3, 6]
    with pytest.raises(ValueError, match=r"num_experts=6.*use one of: 1, 2, 3, 6"):
        check_expert_parallel(cfg, 4)
    before = spawned_children()
    with pytest.raises(ValueError, match="use one of: 1, 2, 3, 6"):
        expert_parallel_layer(models["mixtral"], 0, torch.randn(2, 96), 4)
    assert spawned_children() == before  # refused before anything was spawned
    dense = ModelConfig.from_hf_config(make_tiny_model(tmp_path / "dense") / "config.json")
    with pytest.raises(ValueError, match="needs a mixture-of-experts model.*dense"):
        check_expert_parallel(dense, 2)


# ---------------------------------------------------------------------------------- LLM
def _run(llm: LLM, prompts: list[list[int]]) -> tuple[list, list[torch.Tensor]]:
    """Greedy token ids, and the logits of every step (what the sampler saw)."""
    seen: list[torch.Tensor] = []
    real = llm.engine._sample

    def spy(logits: torch.Tensor, to_sample: list) -> list:
        seen.append(logits.clone())
        return real(logits, to_sample)

    llm.engine._sample = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], seen


@pytest.mark.parametrize("tp,ep", [(2, True), (3, True), (2, False)])
def test_llm_expert_parallel_matches_one_process(models, monkeypatch, tp, ep):
    """LLM(tensor_parallel_size=N, enable_expert_parallel=...): the same greedy tokens, logits
    within fp32 tolerance, and the same tokens-per-expert counts as one process (chunked
    prefill mixed with decode: a budget of 8 tokens per step)."""
    monkeypatch.setenv("MINILLM_TP_TIMEOUT_S", "60")
    prompts = [[5, 9, 11, 40, 41], list(range(20, 39))]
    kwargs = dict(backend="ref", num_kv_blocks=64, max_num_batched_tokens=8)
    one = LLM(str(models["qwen2_moe"]), **kwargs)
    want_tokens, want_logits = _run(one, prompts)
    with LLM(
        str(models["qwen2_moe"]), tensor_parallel_size=tp, enable_expert_parallel=ep, **kwargs
    ) as llm:
        got_tokens, got_logits = _run(llm, prompts)
        got_counts = llm.loaded.model.expert_counts.counts
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want_counts = one.loaded.model.expert_counts.counts
    assert got_counts.tolist() == want_counts.tolist()
    fed = sum(len(p) for p in prompts) + len(prompts) * 5  # prompt tokens + decoded inputs
    assert want_counts.sum(dim=1).tolist() == [fed * 2] * 2  # tokens x top_k, each layer


def test_llm_refuses_bad_expert_parallel_sizes_before_spawning(models, tmp_path):
    before = spawned_children()
    with pytest.raises(ValueError, match="use one of: 1, 2, 3, 6"):
        LLM(
            str(models["mixtral"]),
            backend="ref",
            tensor_parallel_size=4,
            enable_expert_parallel=True,
        )
    dense = make_tiny_model(tmp_path / "dense")
    for tp in (1, 2):
        with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
            LLM(str(dense), backend="ref", tensor_parallel_size=tp, enable_expert_parallel=True)
    assert spawned_children() == before
