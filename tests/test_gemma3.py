"""Gemma 3 270M without transformers: its config, its new ops (cpu against ref, ref against
the plain formula), ref and cpu on the real model, and the hub's assembled file."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from minillm.config_gemma3 import FULL, SLIDING, Gemma3Options
from minillm.formats.gguf import GGUFError, read_header
from minillm.formats.gguf_check import check_model_header
from minillm.hub import bundled_gemma3, list_models, resolve
from minillm.kernels import cpu, ref
from minillm.kv.cache import KVCache
from minillm.loader import load_model
from minillm.model.batch import ForwardBatch, PrefillChunk
from minillm.model.gemma3 import Gemma3Model, check_backend
from minillm.model.scoring import sequence_logits


def last_logits(model: Gemma3Model, ids: list[int], chunk: int = 200) -> torch.Tensor:
    """The last position's logits (V,), prefilled in chunks through a paged cache: only one
    row of the 262k-wide vocabulary projection is ever made."""
    cfg, n, bs = model.config, len(ids), 16
    kv = KVCache(cfg.num_layers, -(-n // bs), bs, cfg.num_kv_heads, cfg.head_dim)
    table = torch.arange(-(-n // bs))
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        pos = torch.arange(start, end)
        batch = ForwardBatch(
            torch.tensor(ids[start:end]), pos, pos, 0, torch.zeros(0, 0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long), [PrefillChunk(0, end - start, end, table)],
            torch.tensor([end - start - 1]),
        )  # fmt: skip
        logits = model.forward(batch, kv.k, kv.v)
    return logits[0]


# ------------------------------------------------------------------ config from the GGUF
def test_config_reads_the_gguf_and_llama_cpp_defaults(gemma3_gguf_path):
    header = read_header(gemma3_gguf_path)
    cfg = check_model_header(gemma3_gguf_path, header.metadata, header.tensors)
    md = header.metadata
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size) == ("gemma3", 18, 640)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.vocab_size == len(md["tokenizer.ggml.tokens"]) == 262144
    assert cfg.rope_theta == md["gemma3.rope.freq_base"] == 1e6 and cfg.tie_word_embeddings
    g = cfg.gemma3
    assert g.sliding_window == md["gemma3.attention.sliding_window"] == 512
    assert [i for i, t in enumerate(g.layer_types) if t == FULL] == [5, 11, 17]  # every 6th
    assert g.rope_local_theta == 10_000.0 and g.query_pre_attn_scalar == 256.0
    assert g.final_logit_softcapping is None  # Gemma 3 has none
    # shapes add up: the GGUF's tensors hold about the parameters the config counts
    n = sum(math.prod(t.shape) for t in header.tensors)
    assert n == cfg.num_params


def test_bad_gemma3_metadata_is_named(gemma3_gguf_path):
    header = read_header(gemma3_gguf_path)
    for key, value, words in [
        ("gemma3.attention.sliding_window", 0, "sliding_window"),
        ("gemma3.attention.sliding_window_pattern", [True] * 3, "3 entries for 18 layers"),
        ("gemma3.attn_logit_softcapping", 50.0, "soft-capping"),
    ]:
        md = {**header.metadata, key: value}
        with pytest.raises(GGUFError, match=words):
            check_model_header(gemma3_gguf_path, md, header.tensors)
    tensors = [t for t in header.tensors if t.name != "blk.3.attn_k_norm.weight"]
    with pytest.raises(GGUFError, match="blk.3.attn_k_norm.weight"):
        check_model_header(gemma3_gguf_path, header.metadata, tensors)


def test_options_validate():
    with pytest.raises(ValueError, match="layer_types"):
        Gemma3Options(4, ("local",), 1e4, 256.0)
    with pytest.raises(ValueError, match="sliding_window"):
        Gemma3Options(0, (SLIDING,), 1e4, 256.0)


# ------------------------------------------------------------------ the new ops
def _window_mask_attention(q, k, v, q_pos, window, scale):
    """The formula, written out: softmax over keys j with q_pos - window < j <= q_pos."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for i, p in enumerate(q_pos):
        lo = max(0, p - window + 1) if window else 0
        for h in range(q.shape[1]):
            keys, vals = k[lo : p + 1, h // group], v[lo : p + 1, h // group]
            out[i, h] = torch.softmax(keys @ q[i, h] * scale, dim=0) @ vals
    return out


@pytest.mark.parametrize("window", [0, 1, 5, 8, 13])
def test_windowed_attention_matches_the_formula_and_cpu_matches_ref(window):
    g = torch.Generator().manual_seed(window)
    nb, bs, kvh, h, d, ctx = 9, 4, 2, 4, 8, 30
    kc, vc = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)
    table = torch.tensor([3, 0, 7, 1, 8, 2, 5, 4])  # scattered blocks: 8 x 4 slots >= 30
    k_seq, v_seq = ref.gather_kv(kc, table, ctx), ref.gather_kv(vc, table, ctx)
    # a prefill of the last 11 tokens
    q = torch.randn(11, h, d, generator=g)
    want = _window_mask_attention(q, k_seq, v_seq, list(range(ctx - 11, ctx)), window, 0.3)
    got_ref = ref.attention_prefill(q, kc, vc, table, ctx, 0.3, window=window)
    got_cpu = cpu.attention_prefill(q, kc, vc, table, ctx, 0.3, window=window)
    torch.testing.assert_close(got_ref, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cpu, want, rtol=1e-5, atol=1e-5)
    # decode: three sequences of different lengths share the table (padded rows)
    lens = torch.tensor([30, 17, 6])
    qd = torch.randn(3, h, d, generator=g)
    want = torch.stack(
        [
            _window_mask_attention(qd[b : b + 1], k_seq, v_seq, [int(n) - 1], window, 0.3)[0]
            for b, n in enumerate(lens)
        ]
    )
    tables = table.repeat(3, 1)
    for got in (
        ref.attention_decode_paged(qd, kc, vc, tables, lens, 0.3, window=window),
        cpu.attention_decode_paged(qd, kc, vc, tables, lens, 0.3, window=window),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_window_never_reads_blocks_before_it():
    """Blocks wholly before the window may be freed and reused: poison them, nothing moves."""
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(6, 4, 1, 8, generator=g), torch.randn(6, 4, 1, 8, generator=g)
    table, q = torch.tensor([[0, 1, 2, 3, 4]]), torch.randn(1, 2, 8, generator=g)
    lens = torch.tensor([19])  # window 8: positions 11..18, blocks 2..4
    before = [b.attention_decode_paged(q, kc, vc, table, lens, 0.5, window=8) for b in (cpu, ref)]
    kc[:2], vc[:2] = float("nan"), float("nan")  # cpu: never read at all
    assert torch.equal(cpu.attention_decode_paged(q, kc, vc, table, lens, 0.5, window=8), before[0])
    kc[:2], vc[:2] = 1e4, -1e4  # ref gathers whole blocks, then masks them out
    after = ref.attention_decode_paged(q, kc, vc, table, lens, 0.5, window=8)
    torch.testing.assert_close(after, before[1], rtol=1e-5, atol=1e-6)


def test_gelu_tanh_mul_cpu_matches_torch():
    g = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.randn(5, 64, generator=g) * 4, torch.tensor([[-80.0, 80.0] * 32])])
    up = torch.randn(6, 64, generator=g)
    want = torch.nn.functional.gelu(gate.double(), approximate="tanh") * up.double()
    torch.testing.assert_close(ref.gelu_tanh_mul(gate, up).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu.gelu_tanh_mul(gate, up).double(), want, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="gelu_tanh_mul"):
        cpu.gelu_tanh_mul(gate, up[:3])
    with pytest.raises(ValueError, match="window"):
        cpu.attention_decode_paged(torch.zeros(1, 1, 8), torch.zeros(1, 4, 1, 8),
                                   torch.zeros(1, 4, 1, 8), torch.zeros(1, 1, dtype=torch.long),
                                   torch.tensor([1]), 1.0, window=-1)  # fmt: skip


def test_a_backend_without_the_ops_is_refused_by_name():
    import types

    bare = types.SimpleNamespace(**{**{k: getattr(ref, k) for k in dir(ref)}, "name": "bare"})
    del bare.gelu_tanh_mul
    with pytest.raises(ValueError, match="'bare' backend cannot run Gemma 3.*gelu_tanh_mul"):
        check_backend(bare)


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def models(gemma3_gguf_path):
    # the exact path: ref's fp32 arithmetic is the reference (int8 activations: test_kernels_a8)
    return load_model(gemma3_gguf_path, "ref"), load_model(
        gemma3_gguf_path, "cpu", activations="fp32"
    )


def test_ref_and_cpu_agree_on_the_real_model(models):
    lm_ref, lm_cpu = models
    assert isinstance(lm_ref.model, Gemma3Model) and isinstance(lm_cpu.model, Gemma3Model)
    ids = lm_ref.tokenizer.encode("北京是中国的首都。The quick brown fox: def f(x): return x")
    a, b = sequence_logits(lm_ref.model, ids), sequence_logits(lm_cpu.model, ids)
    assert a.abs().max() > 10  # a real signal
    assert (a - b).abs().max().item() < 2e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_q5_0_and_q6_k_stay_quantized_on_cpu(models):
    _, lm_cpu = models
    packed = [w for layer in lm_cpu.model.layers for w in (layer.wq, layer.w_down, layer.wv)]
    formats = {w.format for w in packed}
    assert {"Q5_0", "Q6_K", "Q4_K", "Q8_0"} <= formats
    for w in packed:  # int8 or 4-bit codes: never float32 rows
        assert w.codes.dtype in (np.int8, np.uint8), (w.format, w.codes.dtype)
        assert w.nbytes * 8 / (w.rows * w.cols) < 11  # bits per weight, float32 would be 32


# ------------------------------------------------------------------ the hub
def test_listed_and_assembled_into_the_model_store(gemma3_gguf_path, tmp_path, monkeypatch):
    assert gemma3_gguf_path == bundled_gemma3.store_path()
    assert gemma3_gguf_path.stat().st_size == bundled_gemma3.expected_size()
    # a fresh store: listing does not assemble; resolving does, once, with the right bytes
    monkeypatch.setenv("MINILLM_HOME", str(tmp_path / "home"))
    row = {r.name: r for r in list_models()}["gemma3-270m"]
    assert (row.source, row.path.exists()) == ("bundled", False)
    path = resolve("gemma3:270m").path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == importlib_assembler().EXPECTED_SHA256
    mtime = path.stat().st_mtime_ns
    assert resolve("gemma3-270m").path == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def importlib_assembler():  # noqa: ANN201 - the package's module
    import importlib

    return importlib.import_module(bundled_gemma3.PACKAGE)


def test_all_global_layers_change_the_answer_past_the_window(models):
    """The windows are not decoration: past 512 tokens, attending to everything differs."""
    lm_ref, _ = models
    model = lm_ref.model
    ids = lm_ref.tokenizer.encode(" ".join(f"item {i} is {i * 7 % 13}." for i in range(120)))
    assert len(ids) > 600
    windowed = last_logits(model, ids)
    opts = model.options
    model.options = replace(opts, layer_types=(FULL,) * len(opts.layer_types))
    try:
        everything = last_logits(model, ids)
    finally:
        model.options = opts
    assert (windowed - everything).abs().max() > 0.05


def test_minillm_run_continues_a_chinese_prompt(gemma3_gguf_path, capsys):
    """A base model with no chat template (and no ChatML tokens) continues the text as is."""
    from minillm.cli import main

    args = ["run", "gemma3-270m", "--backend", "cpu", "--temperature", "0", "--max-tokens", "8"]
    assert main([*args, "北京是中国的"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("首都，也是中国"), out[:80]
    assert "<|im_start|>" not in out
