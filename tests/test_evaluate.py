"""Scoring and perplexity against transformers' own log-likelihoods on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from minillm import LLM
from minillm.compress.evaluate import (
    EVAL_MODULES,
    corpus_fingerprint,
    perplexity,
    stdlib_docs_corpus,
    task_check,
)
from minillm.model.scoring import token_logprobs
from minillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("ev") / "m", "qwen2", seed=6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return LLM(str(path), backend="ref"), hf


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_token_logprobs_match_transformers(tiny):
    llm, hf = tiny
    ids = [(11 * i) % 300 + 3 for i in range(150)]
    ours = token_logprobs(llm.loaded.model, ids, chunk=40)  # several chunks through the cache
    assert torch.allclose(ours, hf_logprobs(hf, ids), atol=1e-4)


def test_perplexity_is_exp_mean_nll_over_windows(tiny):
    llm, hf = tiny
    ids = [(5 * i) % 300 + 3 for i in range(130)]
    got = perplexity(llm.loaded.model, ids, window=50)
    lps = torch.cat(
        [hf_logprobs(hf, ids[s : s + 50]) for s in range(0, 129, 50) if len(ids[s : s + 50]) > 1]
    )
    assert got.num_tokens == lps.numel() == 49 + 49 + 29
    assert got.value == pytest.approx(math.exp(-lps.double().mean().item()), rel=1e-4)


def test_corpus_is_fixed_and_english():
    a, b = stdlib_docs_corpus(), stdlib_docs_corpus()
    assert a == b and corpus_fingerprint(a) == corpus_fingerprint(b)
    assert len(a) > 20_000 and a.isascii()
    assert "json" in EVAL_MODULES and "JSON" in a


def test_task_check_counts():
    r = task_check([[1, 2, 3], [4, 5], [9]], [[1, 2, 3], [4, 6], [8, 8]])
    assert r.exact == pytest.approx(1 / 3)
    assert r.prefix == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        task_check([], [])
