"""Quantization: primitives against formulas written here, whole models, AWQ, KV int8, the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from minillm import LLM
from minillm.cli import main as cli_main
from minillm.compress.awq import awq_scale_model
from minillm.compress.calibration import calibration_ids, capture_activations
from minillm.compress.export import save_quantized_gguf, source_metadata
from minillm.compress.kv_int8 import (
    fake_quantize_kv_int8,
    kv_bytes_per_token,
    kv_int8_ops,
    quantize_kv_int8,
)
from minillm.compress.quantize import (
    LINEAR_FIELDS,
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    fake_quantize_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_model,
)
from minillm.formats.blocks import quantize
from minillm.kernels import get_backend
from minillm.loader import read_model_files
from minillm.model.llama import LlamaModel
from minillm.model.scoring import sequence_logits
from minillm.testing import make_tiny_model

GEN = torch.Generator().manual_seed(0)


# ----------------------------------------------------------------- references, written here
def ref_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gpt-fast-style symmetric per-channel int8, one row at a time."""
    q, s = np.zeros(w.shape, np.int8), np.zeros(len(w), np.float32)
    for r, row in enumerate(w):
        s[r] = np.abs(row).max() / np.float32(127) or 1.0
        q[r] = np.clip(np.rint(row / s[r]), -127, 127)
    return q, s


def ref_int4_groups(w: np.ndarray, group: int) -> np.ndarray:
    """Asymmetric int4 fake quantization, one group at a time: min -> 0, max -> 15."""
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            x = w[r, g : g + group]
            lo = x.min()
            d = (x.max() - lo) / np.float32(15) or np.float32(1)
            out[r, g : g + group] = np.clip(np.rint((x - lo) / d), 0, 15) * d + lo
    return out


def not_a_tie(x: np.ndarray) -> np.ndarray:
    return np.abs(x - np.floor(x) - 0.5) > 1e-3  # exact halves may round either way


# ----------------------------------------------------------------- primitives
def test_int8_per_channel_matches_reference():
    w = torch.randn(24, 96, generator=GEN) * torch.rand(24, 1, generator=GEN)
    w[3] = 0  # a zero row
    w[5, 7] = 9.0  # an outlier only widens its own row's scale
    q, s = quantize_int8_per_channel(w)
    q_ref, s_ref = ref_int8_rows(w.numpy())
    assert q.dtype == torch.int8 and s.shape == (24,)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-6)
    ok = not_a_tie(w.numpy() / s_ref[:, None])
    assert np.array_equal(q.numpy()[ok], q_ref[ok])
    back = dequantize_int8_per_channel(q, s)
    assert bool(((back - w).abs() <= s[:, None] / 2 + 1e-7).all())
    assert int(q.abs().amax(dim=1)[5]) == 127 and torch.equal(back[3], w[3])


def test_int4_groupwise_matches_reference_and_q4_1():
    w = torch.randn(16, 128, generator=GEN) * 0.05
    w[2, 40] = 0.8
    for group in (32, 64, 128):
        q, scale, offset = quantize_int4_groupwise(w, group)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert scale.shape == offset.shape == (16, 128 // group)
        back = dequantize_int4_groupwise(q, scale, offset, group)
        ref = ref_int4_groups(w.numpy(), group)
        assert np.mean(np.isclose(back.numpy(), ref, atol=1e-6)) > 0.995  # ties aside
        assert bool(((back - w).abs() <= scale.repeat_interleave(group, 1) / 2 + 1e-6).all())
    # group 32 asymmetric is Q4_1's layout: same grid, up to Q4_1's fp16 scale and min
    q4_1 = quantize(w.numpy(), "Q4_1").dequantize()
    np.testing.assert_allclose(fake_quantize_int4(w, 32).numpy(), q4_1, atol=1e-3)  # step ~0.02


def test_symmetric_int4_keeps_zero_and_a_ragged_tail_is_its_own_group():
    w = torch.randn(4, 96, generator=GEN)
    q, scale, offset = quantize_int4_groupwise(w, 32, asymmetric=False)
    assert torch.allclose(offset, -8 * scale)
    assert int((q.int() - 8).abs().max()) <= 7
    assert torch.equal(fake_quantize_int4(torch.zeros(2, 32), 32, asymmetric=False),
                       torch.zeros(2, 32))  # fmt: skip
    # 96 = 64 + 32: the last 32 columns form one group of their own
    ragged = fake_quantize_int4(w, 64)
    assert torch.equal(ragged[:, :64], fake_quantize_int4(w[:, :64], 64))
    assert torch.equal(ragged[:, 64:], fake_quantize_int4(w[:, 64:], 32))
    with pytest.raises(ValueError, match="not a multiple of group_size=64"):
        quantize_int4_groupwise(w, 64)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_int8_per_channel(torch.zeros(3))


# ----------------------------------------------------------------- whole models (tiny)
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("q") / "llama", "llama", seed=2)
    config, weights, tokenizer = read_model_files(folder)
    return folder, config, weights, tokenizer


def logits(config, weights, ids, ops=None):  # noqa: ANN001, ANN201
    return sequence_logits(LlamaModel(config, weights, ops or get_backend("ref")), ids)


@pytest.mark.parametrize(
    ("method", "fmt"),
    [("q8_0", "Q8_0"), ("q5_0", "Q5_0"), ("q4_0", "Q4_0"), ("int4", "Q4_1"), ("q4_k", "Q5_0"),
     ("q6_k", "Q8_0")],
)  # fmt: skip
def test_block_methods_store_linears_in_their_format(tiny, method, fmt):
    # the tiny model's rows (64, 128 wide) are too short for K-quants: they fall back as in
    # llama.cpp's llama-quantize (Q4_K -> Q5_0, Q6_K -> Q8_0)
    _, config, weights, _ = tiny
    qm = quantize_model(config, weights, method)
    for lw, src in zip(qm.weights.layers, weights.layers, strict=True):
        for f in LINEAR_FIELDS:
            t = getattr(lw, f)
            assert t.format == fmt and t.shape == getattr(src, f).shape
        assert lw.attn_norm is src.attn_norm  # norms untouched
    assert qm.weights.embed.format == "Q8_0"  # F32 source embeddings are stored as Q8_0


@pytest.mark.parametrize("method", ["q8_0", "q5_0", "int8", "awq-int4"])
def test_written_file_loads_as_the_model_in_memory(tiny, tmp_path, method):
    folder, config, weights, tokenizer = tiny
    calib = calibration_ids(tokenizer, 96) if method.startswith("awq") else None
    qm = quantize_model(config, weights, method, calib)
    path = save_quantized_gguf(qm, tmp_path / f"{method}.gguf", source_metadata(folder, config,
                                                                                 tokenizer))  # fmt: skip
    llm = LLM(str(path), backend="ref")
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    want = logits(config, qm.weights, ids)
    got = sequence_logits(llm.loaded.model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    original = logits(config, weights, ids)
    assert (got - original).abs().max() > 1e-4  # it really is quantized
    if method == "int8":
        assert 8.0 < qm.linear_bits_per_weight < 8.6


def test_awq_folding_keeps_the_fp32_model_exact(tiny):
    _, config, weights, tokenizer = tiny
    res = awq_scale_model(config, weights, calibration_ids(tokenizer, 96), group_size=32, n_grid=8)
    assert len(res.searches) == 4 * config.num_layers
    assert any(s.alpha > 0 for s in res.searches)
    assert all(s.error <= s.rtn_error for s in res.searches)
    ids = tokenizer.encode("KV cache, paged attention and quantization.")
    torch.testing.assert_close(
        logits(config, res.weights, ids), logits(config, weights, ids), atol=1e-4, rtol=1e-4
    )


def test_quantize_model_rejects_bad_calls(tiny):
    _, config, weights, _ = tiny
    with pytest.raises(ValueError, match="unknown quantization method 'q3_x'"):
        quantize_model(config, weights, "q3_x")
    with pytest.raises(ValueError, match="needs calibration token ids"):
        quantize_model(config, weights, "awq-int4")
    with pytest.raises(ValueError, match="in-memory experiment"):
        save_quantized_gguf(quantize_model(config, weights, "int4-g64"), "x.gguf", {})


# ----------------------------------------------------------------- AWQ on the real model
@pytest.fixture(scope="module")
def real_two_layers(bundled_gguf_path):
    """The bundled model's first two layers: their activations are those of the full model."""
    config, weights, tokenizer = read_model_files(bundled_gguf_path)
    config = replace(config, num_layers=2)
    weights = replace(weights, layers=weights.layers[:2])
    return config, weights, calibration_ids(tokenizer, 128)


def test_awq_beats_round_to_nearest_on_real_activations(real_two_layers):
    config, weights, calib = real_two_layers
    acts = capture_activations(config, weights, calib)
    res = awq_scale_model(config, weights, calib, group_size=128, n_grid=10, activations=acts)
    assert all(s.error <= s.rtn_error for s in res.searches)
    assert sum(s.error for s in res.searches) < 0.9 * sum(s.rtn_error for s in res.searches)
    # Independently: layer 0's q/k/v outputs on the calibration inputs, with the reference
    # int4 quantizer of this file, folded AWQ weights vs plain RTN of the original weights.
    x = acts.inputs[(0, "attn_in")].numpy()
    norm_ratio = (
        weights.layers[0].attn_norm.dequantize() / res.weights.layers[0].attn_norm.dequantize()
    )

    def stack(lw):  # noqa: ANN001, ANN202
        return np.concatenate([lw.wq.dequantize(), lw.wk.dequantize(), lw.wv.dequantize()])

    w, w_awq = stack(weights.layers[0]), stack(res.weights.layers[0])
    exact = x @ w.T
    ragged = (
        lambda m: np.concatenate(  # noqa: E731 - 576 = 4 x 128 + 64
            [ref_int4_groups(m[:, :512], 128), ref_int4_groups(m[:, 512:], 64)], axis=1
        )
    )
    rtn_err = np.mean((x @ ragged(w).T - exact) ** 2)
    awq_err = np.mean(((x / norm_ratio) @ ragged(w_awq).T - exact) ** 2)
    assert awq_err < rtn_err


def test_q4_k_on_real_rows_is_q4_k_where_256_fits_and_q5_0_elsewhere(real_two_layers, tmp_path,
                                                                      bundled_gguf_path):  # fmt: skip
    # SmolLM2: hidden 576 = 2.25 x 256, so only ffn_down (rows of 1536 = 6 x 256) takes Q4_K
    config, weights, _ = real_two_layers
    qm = quantize_model(config, weights, "q4_k")
    for lw in qm.weights.layers:
        formats = {f: getattr(lw, f).format for f in LINEAR_FIELDS}
        assert formats == {**dict.fromkeys(LINEAR_FIELDS, "Q5_0"), "w_down": "Q4_K"}
    # w_down holds 1/4 of each layer's linear weights (3 x 576 x 1536 of 4 x 576 x 1536 + ...)
    n = {f: getattr(qm.weights.layers[0], f).n_elements for f in LINEAR_FIELDS}
    share = n["w_down"] / sum(n.values())
    assert qm.linear_bits_per_weight == pytest.approx(4.5 * share + 5.5 * (1 - share))
    path = save_quantized_gguf(qm, tmp_path / "two-q4_k.gguf",
                               source_metadata(bundled_gguf_path, config, None))  # fmt: skip
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M, as llama.cpp
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.1.ffn_down.weight"] == "Q4_K" and kinds["blk.1.attn_q.weight"] == "Q5_0"
    _, back, _ = read_model_files(path)
    assert np.array_equal(back.layers[1].w_up.data, qm.weights.layers[1].w_up.data)


# ----------------------------------------------------------------- KV int8
def test_kv_int8_per_token_per_head():
    x = torch.randn(5, 3, 16, generator=GEN)
    x[1, 2] *= 100  # one loud head of one token keeps its own scale
    q, scale = quantize_kv_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 3, 1)
    expected_scale = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(scale, expected_scale)
    assert bool(((fake_quantize_kv_int8(x) - x).abs() <= expected_scale / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="tokens, kv_heads, head_dim"):
        quantize_kv_int8(torch.zeros(4, 8))


def test_kv_int8_ops_change_logits_a_little(tiny):
    _, config, weights, tokenizer = tiny
    ids = tokenizer.encode("def add(a, b):\n    return a + b\n" * 3)
    base = logits(config, weights, ids)
    int8 = logits(config, weights, ids, kv_int8_ops(get_backend("ref")))
    diff = (int8 - base).abs().max()
    assert 0 < diff < 0.05 * base.abs().max()
    assert kv_bytes_per_token(config, "fp32") == config.kv_bytes_per_token
    assert kv_bytes_per_token(config, "int8") == 2 * 2 * 2 * (16 + 2)  # layers, kv heads, D=16


# ----------------------------------------------------------------- CLI
def test_cli_quantize_writes_a_loadable_file(tiny, tmp_path, capsys):
    folder, config, _, _ = tiny
    out = tmp_path / "tiny-q4_0.gguf"
    assert cli_main(["quantize", str(folder), "--to", "q4_0", "-o", str(out)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert LLM(str(out), backend="ref").config.num_layers == config.num_layers
    assert cli_main(["quantize", str(folder), "--to", "q4_0", "-o", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli_main(["quantize", str(folder), "--to", "q4_0", "-o", str(tmp_path / "x.bin")]) == 1
    assert cli_main(["quantize", str(folder), "--to", "q2_xs", "-o", str(out)]) == 2
