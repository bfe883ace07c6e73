"""Pruning: exact sparsity, valid 2:4 patterns, Wanda's ranking, and structured pruning that
shrinks the matrices and still matches transformers on the pruned weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

from minillm import LLM
from minillm.compress.calibration import calibration_ids, capture_activations
from minillm.compress.hf_export import save_hf_folder
from minillm.compress.prune import (
    LINEAR_INPUTS,
    magnitude_mask,
    n_m_mask,
    prune_heads,
    prune_matrix,
    prune_mlp_channels,
    prune_model,
    row_mask,
    sparsity_of,
    wanda_scores,
)
from minillm.loader import read_model_files
from minillm.model.scoring import sequence_logits
from minillm.testing import make_tiny_model

GEN = torch.Generator().manual_seed(1)


def test_magnitude_removes_exactly_the_smallest():
    w = torch.randn(32, 48, generator=GEN)
    for sparsity in (0.0, 0.25, 0.5, 0.9):
        pruned = prune_matrix(w, "magnitude", sparsity)
        k = round(sparsity * w.numel())
        zeros = (pruned == 0).numpy().ravel()
        expected = np.zeros(w.numel(), bool)
        expected[np.argsort(np.abs(w.numpy()).ravel(), kind="stable")[:k]] = True
        assert zeros.sum() == k and np.array_equal(zeros, expected)
        assert torch.equal(pruned[pruned != 0], w[pruned != 0])
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_mask(w, 1.5)


def test_wanda_keeps_the_largest_weight_times_input_norm_per_row():
    w = torch.randn(16, 64, generator=GEN)
    x = torch.randn(200, 64, generator=GEN) * torch.linspace(0.1, 5, 64)  # loud late channels
    norm = x.norm(dim=0)
    pruned = prune_matrix(w, "wanda", 0.5, norm)
    score = np.abs(w.numpy()) * np.sqrt((x.numpy() ** 2).sum(0))[None, :]
    for r in range(16):
        kept = pruned[r] != 0
        assert int(kept.sum()) == 32  # exactly half of every row
        assert score[r][kept.numpy()].min() >= score[r][~kept.numpy()].max()
    # differs from magnitude: the input norms changed the ranking
    assert not torch.equal(pruned == 0, prune_matrix(w, "magnitude", 0.5) == 0)
    with pytest.raises(ValueError, match="needs the input channels' norms"):
        prune_matrix(w, "wanda", 0.5)
    with pytest.raises(ValueError, match="one per input"):
        wanda_scores(w, norm[:10])


def test_two_four_pattern_is_valid_and_keeps_the_top_two():
    w = torch.randn(8, 32, generator=GEN)
    norm = torch.rand(32, generator=GEN) + 0.1
    for method, score in (("magnitude-2:4", w.abs()), ("wanda-2:4", w.abs() * norm)):
        pruned = prune_matrix(w, method, x_norm=norm)
        groups, s = pruned.reshape(8, 8, 4), score.reshape(8, 8, 4)
        assert bool(((groups != 0).sum(-1) == 2).all())
        kept = groups != 0
        assert bool((s.masked_fill(~kept, float("inf")).amin(-1)
                     >= s.masked_fill(kept, -float("inf")).amax(-1)).all())  # fmt: skip
    with pytest.raises(ValueError, match="multiple of m=4"):
        n_m_mask(torch.zeros(2, 6))
    assert row_mask(torch.rand(3, 10), 0.3).sum(1).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_matrix(w, "random")


# ------------------------------------------------------------------ whole models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("p") / "llama", "llama", seed=7)
    config, weights, tokenizer = read_model_files(folder)
    acts = capture_activations(config, weights, calibration_ids(tokenizer, 128), window=64)
    return folder, config, weights, tokenizer, acts


def test_prune_model_sparsity(tiny):
    _, _, weights, _, acts = tiny
    for method in ("magnitude", "wanda", "magnitude-2:4", "wanda-2:4"):
        pruned = prune_model(weights, method, 0.5, acts)
        assert sparsity_of(pruned) == pytest.approx(0.5, abs=1e-3), method
        assert (
            pruned.embed is weights.embed
            and pruned.layers[0].attn_norm is weights.layers[0].attn_norm
        )
    assert sparsity_of(weights) < 0.01
    with pytest.raises(ValueError, match="needs calibration activations"):
        prune_model(weights, "wanda", 0.5)


def hf_logits(folder, ids):  # noqa: ANN001, ANN201
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("how", [{"heads_per_group": 1}, {"kv_groups": 1}])
def test_structured_pruning_shrinks_and_matches_transformers(tiny, tmp_path, how):
    folder, config, weights, tokenizer, acts = tiny
    cfg, pruned = prune_heads(config, weights, acts, **how)
    cfg, pruned = prune_mlp_channels(cfg, pruned, acts, keep=96)
    assert (cfg.num_heads, cfg.num_kv_heads) == ((2, 2) if "heads_per_group" in how else (2, 1))
    lw = pruned.layers[0]
    assert lw.wq.shape == (cfg.num_heads * cfg.head_dim, config.hidden_size)
    assert lw.wk.shape == lw.wv.shape == (cfg.num_kv_heads * cfg.head_dim, config.hidden_size)
    assert lw.wo.shape == (config.hidden_size, cfg.num_heads * cfg.head_dim)
    assert lw.w_gate.shape == lw.w_up.shape == (96, config.hidden_size)
    assert lw.w_down.shape == (config.hidden_size, 96) and cfg.intermediate_size == 96
    out = save_hf_folder(tmp_path / "pruned", cfg, pruned, tokenizer)
    llm = LLM(str(out), backend="ref")
    assert llm.config == replace(cfg, name=llm.config.name)
    ids = tokenizer.encode("Large language models predict the next token. " * 2)
    ours = sequence_logits(llm.loaded.model, ids)
    torch.testing.assert_close(ours, hf_logits(out, ids), atol=1e-4, rtol=1e-4)
    assert (ours - hf_logits(folder, ids)).abs().max() > 1e-3  # it is a different model


def test_pruned_heads_are_the_most_important(tiny):
    _, config, weights, _, acts = tiny
    _, pruned = prune_heads(config, weights, acts, heads_per_group=1)
    d, group = config.head_dim, config.num_heads // config.num_kv_heads
    for i, (lw, new) in enumerate(zip(weights.layers, pruned.layers, strict=True)):
        x = acts.inputs[(i, "o_in")].numpy()
        wo = lw.wo.dequantize()
        # energy each head sends through Wo: sum over its channels of ||X_j||^2 ||Wo[:, j]||^2
        channel = (x**2).sum(0) * (wo**2).sum(0)
        energy = [channel[h * d : (h + 1) * d].sum() for h in range(config.num_heads)]
        want = [max(range(g * group, (g + 1) * group), key=lambda h: energy[h])
                for g in range(config.num_kv_heads)]  # fmt: skip
        kept_cols = new.wo.dequantize()
        for slot, h in enumerate(want):
            assert np.array_equal(
                kept_cols[:, slot * d : (slot + 1) * d], wo[:, h * d : (h + 1) * d]
            )


def test_structured_pruning_rejects_bad_sizes(tiny):
    _, config, weights, _, acts = tiny
    with pytest.raises(ValueError, match="exactly one of"):
        prune_heads(config, weights, acts)
    with pytest.raises(ValueError, match="heads_per_group must be in 1..2"):
        prune_heads(config, weights, acts, heads_per_group=3)
    with pytest.raises(ValueError, match="keep must be in 1..128"):
        prune_mlp_channels(config, weights, acts, keep=0)


# ------------------------------------------------------------------ real activations
def test_wanda_hurts_layer_outputs_less_than_magnitude(bundled_gguf_path):
    config, weights, tokenizer = read_model_files(bundled_gguf_path)
    config, weights = replace(config, num_layers=2), replace(weights, layers=weights.layers[:2])
    acts = capture_activations(config, weights, calibration_ids(tokenizer, 128))
    err = {"magnitude": 0.0, "wanda": 0.0}
    for i, lw in enumerate(weights.layers):
        for field, kind in LINEAR_INPUTS.items():
            w = torch.from_numpy(getattr(lw, field).dequantize())
            x = acts.inputs[(i, kind)]
            for method in err:
                pruned = prune_matrix(w, method, 0.5, acts.l2_norm(i, kind))
                err[method] += float(((x @ (pruned - w).T) ** 2).sum())
    assert err["wanda"] < 0.9 * err["magnitude"]
