"""SamplingParams validation and the Sampler, checked against per-row numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minillm.sampling import (
    Sampler,
    SamplingContext,
    SamplingParams,
    SamplingType,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
)

NEG_INF = -np.inf


# ---------------------------------------------------------------------------- numpy references
# Written from the definitions, one row at a time, in float64.


def np_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    out = np.zeros_like(x)
    e = np.exp(x[finite] - x[finite].max())
    out[finite] = e / e.sum()
    return out


def ref_top_k(row: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= row.size:
        return row.copy()
    kth = np.sort(row)[::-1][k - 1]
    return np.where(row >= kth, row, NEG_INF)  # ties with the k-th are kept


def ref_top_p(row: np.ndarray, p: float) -> np.ndarray:
    if p >= 1:
        return row.copy()
    probs = np_softmax(row)
    ranked = sorted(probs, reverse=True)
    kept, mass = [], 0.0
    for q in ranked:  # keep while the mass of the tokens above is still short of p
        if mass >= p:
            break
        kept.append(q)
        mass += q
    return np.where(probs >= kept[-1], row, NEG_INF)  # ties with the last kept are kept


def ref_min_p(row: np.ndarray, min_p: float) -> np.ndarray:
    if min_p <= 0:
        return row.copy()
    probs = np_softmax(row)
    return np.where(probs >= min_p * probs.max(), row, NEG_INF)


def ref_filtered_probs(row: np.ndarray, t: float, k: int, p: float, min_p: float) -> np.ndarray:
    x = row.astype(np.float64) / t
    return np_softmax(ref_min_p(ref_top_p(ref_top_k(x, k), p), min_p))


def ref_penalties(row, prompt, output, rep, presence, freq) -> np.ndarray:
    x = row.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        x[t] -= freq * output.count(t) + presence
    return x


def ctx(params: SamplingParams, prompt=(0,), output=(), eos=(), generator=None) -> SamplingContext:
    if generator is None:
        generator = make_generator(params)
    return SamplingContext(params, list(prompt), list(output), generator, frozenset(eos))


def rand_logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (batch, vocab))).float()


def assert_same_filter(got: torch.Tensor, want: np.ndarray) -> None:
    got_np = got.double().numpy()
    np.testing.assert_array_equal(np.isneginf(got_np), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got_np[finite], want[finite], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- SamplingParams
INVALID = [
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "2"}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ({"include_stop_str_in_output": None}, "include_stop_str_in_output"),
]


@pytest.mark.parametrize(("kwargs", "name"), INVALID, ids=[f"{n}={k}" for k, n in INVALID])
def test_invalid_field_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_wrong_types_are_also_type_errors():
    with pytest.raises(TypeError, match="temperature"):
        SamplingParams(temperature="hot")


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(np.int64(7),)).stop_token_ids == [7]
    assert (
        SamplingParams(top_k=-1).top_k == -1 and SamplingParams(max_tokens=None).max_tokens is None
    )
    q = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), min_tokens=4, max_tokens=4)
    assert isinstance(q.temperature, float) and isinstance(q.top_k, int)


def test_sampling_type():
    assert SamplingParams(temperature=0).sampling_type is SamplingType.GREEDY
    assert SamplingParams.greedy(max_tokens=3).is_greedy
    assert SamplingParams(temperature=0.7).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.7, seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert not SamplingParams(temperature=0.7).is_greedy


# ---------------------------------------------------------------------------- greedy
def test_greedy_is_argmax():
    logits = rand_logits(16, 500, seed=1)
    params = [SamplingParams.greedy(), SamplingParams(temperature=0.0, top_p=0.5, seed=9)] * 8
    out = Sampler().sample(logits, [ctx(p) for p in params])
    assert [r.token_id for r in out] == logits.argmax(dim=1).tolist()


def test_top_k_1_is_greedy_at_any_temperature():
    logits = rand_logits(16, 500, seed=2)
    contexts = [
        ctx(SamplingParams(temperature=t, top_k=1, seed=i))
        for i, t in enumerate(np.linspace(0.3, 3.0, 16))
    ]
    out = Sampler().sample(logits, contexts)
    assert [r.token_id for r in out] == logits.argmax(dim=1).tolist()


def test_sampler_does_not_modify_the_callers_logits():
    logits = rand_logits(4, 50, seed=3)
    before = logits.clone()
    p = SamplingParams(
        temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.5, min_tokens=2, seed=0
    )
    Sampler().sample(logits, [ctx(p, prompt=[1, 2], output=[3], eos=[4]) for _ in range(4)])
    assert torch.equal(logits, before)


def test_bad_logits_shape_or_count():
    with pytest.raises(ValueError, match="2-D"):
        Sampler().sample(torch.zeros(10), [ctx(SamplingParams())])
    with pytest.raises(ValueError, match="contexts"):
        Sampler().sample(torch.zeros(2, 10), [ctx(SamplingParams())])


# ---------------------------------------------------------------------------- filters vs numpy
B, V = 48, 64


def _settings(seed: int):
    rng = np.random.default_rng(seed)
    ks = rng.choice([-1, 0, 1, 2, 5, 17, V, V + 10], size=B)
    ps = rng.choice([1.0, 0.05, 0.3, 0.5, 0.9, 0.99], size=B)
    mps = rng.choice([0.0, 0.01, 0.1, 0.5, 1.0], size=B)
    ts = rng.uniform(0.2, 2.5, size=B)
    return ks, ps, mps, ts


@pytest.mark.parametrize("coarse", [False, True], ids=["distinct", "many-ties"])
def test_filters_match_reference(coarse):
    logits = rand_logits(B, V, seed=4)
    if coarse:  # integer logits: many ties, including at the cut points
        logits = logits.round()
    ks, ps, mps, ts = _settings(5)
    rows = logits.double().numpy()
    assert_same_filter(
        apply_temperature(logits, torch.tensor(ts)),
        np.stack([r / t for r, t in zip(rows, ts, strict=True)]),
    )
    assert_same_filter(
        apply_top_k(logits, torch.tensor(ks)),
        np.stack([ref_top_k(r, k) for r, k in zip(rows, ks, strict=True)]),
    )
    assert_same_filter(
        apply_top_p(logits, torch.tensor(ps)),
        np.stack([ref_top_p(r, p) for r, p in zip(rows, ps, strict=True)]),
    )
    assert_same_filter(
        apply_min_p(logits, torch.tensor(mps)),
        np.stack([ref_min_p(r, m) for r, m in zip(rows, mps, strict=True)]),
    )


@pytest.mark.parametrize("coarse", [False, True], ids=["distinct", "many-ties"])
def test_filtered_distribution_matches_reference(coarse):
    logits = rand_logits(B, V, seed=6)
    if coarse:
        logits = logits.round()
    ks, ps, mps, ts = _settings(7)
    params = [
        SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(m))
        for k, p, m, t in zip(ks, ps, mps, ts, strict=True)
    ]
    got = Sampler().filtered_probs(logits, params).double().numpy()
    want = np.stack(
        [
            ref_filtered_probs(r, t, k, p, m)
            for r, k, p, m, t in zip(logits.double().numpy(), ks, ps, mps, ts, strict=True)
        ]
    )
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_ties_at_the_cut_are_kept():
    # top_k=2 over [3, 2, 2, 2, 1]: the 2nd largest value is 2, and all three 2s tie with it.
    row = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    kept = torch.isfinite(apply_top_k(row, torch.tensor([2])))[0].tolist()
    assert kept == [True, True, True, True, False]
    # top_p=0.3 over four equal tokens: two are needed to pass 0.3, the other two tie with them.
    flat = torch.zeros(1, 4)
    assert torch.isfinite(apply_top_p(flat, torch.tensor([0.3]))).all()
    # top_p=0.5 over probs (0.5, 0.25, 0.25): the top token alone reaches 0.5.
    row = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert torch.isfinite(apply_top_p(row, torch.tensor([0.5])))[0].tolist() == [True, False, False]
    # min_p=1 keeps exactly the tokens tied with the maximum.
    row = torch.tensor([[1.0, 4.0, 4.0, 0.0]])
    assert torch.isfinite(apply_min_p(row, torch.tensor([1.0])))[0].tolist() == [
        False,
        True,
        True,
        False,
    ]


# ---------------------------------------------------------------------------- empirical draws
N_DRAWS = 20_000
SMALL_LOGITS = torch.tensor([2.0, 1.6, 1.2, 0.9, 0.5, 0.0, -0.8, -2.5])


def _chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


@pytest.mark.parametrize("seeded", [True, False], ids=["own-generator", "global-generator"])
def test_empirical_frequencies_match_filtered_softmax(seeded):
    params = SamplingParams(
        temperature=0.8, top_k=6, top_p=0.95, min_p=0.08, seed=1234 if seeded else None
    )
    want = ref_filtered_probs(SMALL_LOGITS.double().numpy(), 0.8, 6, 0.95, 0.08)
    assert (want == 0).sum() >= 2 and (want > 0).sum() >= 4  # the filters really cut here
    logits = SMALL_LOGITS.expand(N_DRAWS, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(99)
        gen = make_generator(params)  # one stream shared by all rows (None when unseeded)
        out = Sampler().sample(logits, [ctx(params, generator=gen) for _ in range(N_DRAWS)])
    counts = np.bincount([r.token_id for r in out], minlength=8)
    assert counts[want == 0].sum() == 0  # filtered tokens are never drawn
    freq = counts / N_DRAWS
    sigma = np.sqrt(want * (1 - want) / N_DRAWS)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12)
    assert _chi_square_p_value(counts, want) > 1e-3


def test_temperature_changes_the_empirical_distribution():
    # A sanity check that the test above can fail: T=2 frequencies are far from the T=0.8 reference.
    params = SamplingParams(temperature=2.0, seed=5)
    want_wrong = ref_filtered_probs(SMALL_LOGITS.double().numpy(), 0.8, 0, 1.0, 0.0)
    gen = make_generator(params)
    out = Sampler().sample(
        SMALL_LOGITS.expand(5000, -1).contiguous(),
        [ctx(params, generator=gen) for _ in range(5000)],
    )
    counts = np.bincount([r.token_id for r in out], minlength=8)
    assert _chi_square_p_value(counts, want_wrong) < 1e-6


# ---------------------------------------------------------------------------- penalties
def test_penalties_match_reference_formula():
    rng = np.random.default_rng(8)
    logits = rand_logits(6, 40, seed=8)
    prompts = [list(rng.integers(0, 40, size=n)) for n in (1, 5, 12, 3, 0, 7)]
    outputs = [list(rng.integers(0, 40, size=n)) for n in (0, 4, 9, 15, 6, 2)]
    outputs[3] += [outputs[3][0]] * 3  # a token repeated several times
    rep = [1.0, 1.3, 0.8, 2.0, 1.1, 1.0]
    pres = [0.0, 0.5, -0.4, 1.5, 0.0, 2.0]
    freq = [0.0, 0.7, 0.3, -0.2, 1.9, 0.0]
    got = apply_penalties(
        logits, prompts, outputs, torch.tensor(rep), torch.tensor(pres), torch.tensor(freq)
    )
    want = np.stack(
        [
            ref_penalties(r, p, o, *s)
            for r, p, o, s in zip(
                logits.double().numpy(),
                prompts,
                outputs,
                zip(rep, pres, freq, strict=True),
                strict=True,
            )
        ]
    )
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_penalties_steer_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, -1.0, 4.0]])
    # Token 0 was already generated twice: frequency 0.1 * 2 + presence 0.1 drops it below token 1.
    p = SamplingParams.greedy(frequency_penalty=0.1, presence_penalty=0.1)
    assert Sampler().sample(logits, [ctx(p, prompt=[3], output=[0, 0])])[0].token_id == 1
    # Repetition penalty covers the prompt too: tokens 0 and 1 divided by 2 leave token 3 on top.
    p = SamplingParams.greedy(repetition_penalty=2.0)
    assert Sampler().sample(logits, [ctx(p, prompt=[0, 1], output=[])])[0].token_id == 3
    # Without penalties the argmax stands.
    assert Sampler().sample(logits, [ctx(SamplingParams.greedy(), output=[0, 0])])[0].token_id == 0


def test_out_of_range_history_is_rejected():
    with pytest.raises(ValueError, match="token ids"):
        Sampler().sample(
            torch.zeros(1, 10), [ctx(SamplingParams(repetition_penalty=1.2), prompt=[3, 12])]
        )


# ---------------------------------------------------------------------------- min_tokens
def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]])  # EOS=1 on top, stop id 2 next
    p = SamplingParams.greedy(min_tokens=3, stop_token_ids=[2])
    sampler = Sampler()
    assert sampler.sample(logits, [ctx(p, output=[4, 4], eos=[1])])[0].token_id == 3
    assert sampler.sample(logits, [ctx(p, output=[4, 4, 4], eos=[1])])[0].token_id == 1
    # Random rows too: 2000 draws that would be nearly all EOS never produce EOS or stop ids.
    q = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[2], seed=0)
    gen = make_generator(q)
    out = sampler.sample(
        logits.expand(2000, -1).contiguous(), [ctx(q, eos=[1], generator=gen) for _ in range(2000)]
    )
    drawn = {r.token_id for r in out}
    assert not drawn & {1, 2} and drawn >= {3}


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    # vLLM: with ignore_eos, EOS does not end the output, so min_tokens has no reason to mask it.
    logits = torch.tensor([[0.0, 9.0, 8.0]])
    p = SamplingParams.greedy(min_tokens=3, ignore_eos=True, stop_token_ids=[2])
    assert Sampler().sample(logits, [ctx(p, output=[], eos=[1])])[0].token_id == 1


# ---------------------------------------------------------------------------- reproducibility
def _run_steps(params: SamplingParams, steps: int, logits: torch.Tensor) -> list[int]:
    gen, out, sampler = make_generator(params), [], Sampler()
    for _ in range(steps):
        res = sampler.sample(logits, [ctx(params, output=out, generator=gen)])
        out.append(res[0].token_id)
    return out


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(1, 1000)  # flat: any fixed sequence of 30 draws has probability 1e-90
    a = _run_steps(SamplingParams(seed=42), 30, logits)
    b = _run_steps(SamplingParams(seed=42), 30, logits)
    c = _run_steps(SamplingParams(seed=43), 30, logits)
    assert a == b
    assert a != c


def test_seeded_row_does_not_depend_on_its_batch_neighbours():
    logits = rand_logits(5, 300, seed=10, scale=1.0)
    p = SamplingParams(temperature=1.3, top_p=0.95, seed=7)
    alone = Sampler().sample(logits[2:3], [ctx(p)])[0].token_id
    others = [
        ctx(SamplingParams(temperature=0.9)),
        ctx(SamplingParams.greedy()),
        ctx(p),
        ctx(SamplingParams(seed=1)),
        ctx(SamplingParams(top_k=3)),
    ]
    with torch.random.fork_rng():
        batched = Sampler().sample(logits, others)[2].token_id
    assert alone == batched


def test_make_generator():
    assert make_generator(SamplingParams()) is None
    p = SamplingParams(seed=11)
    g0, g0b, g1 = make_generator(p), make_generator(p), make_generator(p, index=1)
    a, b, c = (torch.rand(8, generator=g) for g in (g0, g0b, g1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.rand(8, generator=torch.Generator().manual_seed(11)))


# ---------------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_and_top_logprobs_has_k_entries():
    logits = rand_logits(3, 200, seed=12)
    raw = torch.log_softmax(logits.double(), dim=1).numpy()
    params = [
        SamplingParams(temperature=0.5, top_k=4, repetition_penalty=1.5, logprobs=5, seed=1),
        SamplingParams.greedy(logprobs=0),
        SamplingParams(temperature=1.0, seed=2),
    ]
    out = Sampler().sample(logits, [ctx(p, prompt=[0, 1, 2], output=[3]) for p in params])
    for row, res in enumerate(out):
        assert res.logprob == pytest.approx(raw[row, res.token_id], abs=1e-5)
    top = out[0].top_logprobs
    best5 = np.argsort(-raw[0])[:5]
    assert set(best5) <= set(top) and set(top) <= set(best5) | {out[0].token_id}
    for tok, lp in top.items():
        assert lp == pytest.approx(raw[0, tok], abs=1e-5)
    assert out[1].top_logprobs == {
        out[1].token_id: pytest.approx(raw[1, out[1].token_id], abs=1e-5)
    }
    assert out[2].top_logprobs is None


def test_sampled_token_outside_top_k_logprobs_is_added():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    p = SamplingParams.greedy(logprobs=2, repetition_penalty=100.0)  # pushes greedy to token 2
    res = Sampler().sample(logits, [ctx(p, prompt=[0, 1])])[0]
    assert res.token_id == 2
    assert set(res.top_logprobs) == {0, 1, 2}


def test_top_p_and_top_k_on_a_real_sized_vocabulary():
    """Wide vocabularies take the partial-sort fast path for peaked rows and the full sort for
    flat ones; both must equal the full-sort reference."""
    gen = torch.Generator().manual_seed(11)
    vocab = 5000
    peaked = torch.randn(3, vocab, generator=gen) * 6  # nucleus within a few hundred tokens
    flat = torch.randn(3, vocab, generator=gen) * 0.1  # nucleus of thousands of tokens
    logits = torch.cat([peaked, flat])
    ps = [0.5, 0.9, 0.99, 0.5, 0.9, 0.99]
    got = apply_top_p(logits, torch.tensor(ps))
    want = np.stack([ref_top_p(r, p) for r, p in zip(logits.double().numpy(), ps, strict=True)])
    np.testing.assert_array_equal(torch.isfinite(got).numpy(), np.isfinite(want))
    ks = [1, 40, 300, 0, 4999, 5000]
    got_k = apply_top_k(logits, torch.tensor(ks))
    want_k = np.stack([ref_top_k(r, k) for r, k in zip(logits.numpy(), ks, strict=True)])
    np.testing.assert_array_equal(torch.isfinite(got_k).numpy(), np.isfinite(want_k))
