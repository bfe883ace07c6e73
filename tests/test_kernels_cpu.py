"""The Numba ``cpu`` backend against the torch ``ref`` backend, op by op and on whole models,
with fp32 activations (the int8 ones: tests/test_kernels_a8.py).

Tolerances (fp32): a matmul result may differ from ref only by summation order, so the bound
is 1e-5 * sum_k |x_k * w_k| per output (one wrong 4-bit code would be off by ~1/K of that sum,
far above it); elementwise ops and attention use rtol=atol=1e-5 (1e-4 for attention's
exp/rescale chain), relative to values of order 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.formats.blocks import BLOCK_LAYOUT, quantize
from minillm.kernels import cpu, ref
from minillm.kernels.cpu_packing import PackedWeight

FORMATS = ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q8_0", "Q6_K", "F32", "F16", "BF16"]
FEW = settings(max_examples=12, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def fp32_activations():  # noqa: ANN201
    """This file checks the exact path, fp32 activations, against ref's fp32 arithmetic. The
    int8 activations (the default for quantized weights) quantize x first, so they have their
    own reference and tests (tests/test_kernels_a8.py)."""
    with cpu.activations("fp32"):
        yield


def _weights(
    fmt: str, rows: int, blocks: int, seed: int
) -> tuple[object, PackedWeight, torch.Tensor]:
    """A random quantized matrix, its cpu packing and its ref (dequantized fp32) form."""
    elems = BLOCK_LAYOUT[fmt][0]
    cols = blocks * elems if elems > 1 else 16 * blocks + 3  # float formats: any width
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qt = quantize(w, fmt)
    return qt, cpu.prepare_linear(qt), ref.prepare_linear(qt)


def _assert_matmul_close(
    y: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor
) -> None:
    bound = 1e-5 * (x.abs() @ w.abs().T) + 1e-30
    excess = ((y - want).abs() / bound).max().item()
    assert excess <= 1.0, f"error up to {excess:.2f}x the fp32 summation bound"


# ----------------------------------------------------------------------------- linear
@pytest.mark.parametrize("fmt", FORMATS)
@FEW
@given(
    t=st.sampled_from([1, 2, 3, 4, 8, 9, 20]),  # one by one (< 4), token groups of 8, partial
    rows=st.integers(1, 37),  # past one 16-row chunk; odd counts leave a row unpaired
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_ref(fmt: str, t: int, rows: int, blocks: int, seed: int) -> None:
    qt, packed, dense = _weights(fmt, rows, blocks, seed)
    x = torch.from_numpy(
        np.random.default_rng(seed + 1).standard_normal((t, packed.cols)).astype(np.float32)
    )
    y = cpu.linear(x, packed)
    assert y.shape == (t, rows) and y.dtype == torch.float32
    _assert_matmul_close(y, ref.linear(x, dense), x, dense)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "F16"])
def test_linear_bias_and_leading_dims(fmt: str) -> None:
    qt, packed, dense = _weights(fmt, 7, 2, seed=3)
    x = torch.randn(2, 3, packed.cols, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(7, generator=torch.Generator().manual_seed(1))
    y = cpu.linear(x, packed, bias)
    want = ref.linear(x, dense, bias)
    assert y.shape == (2, 3, 7)
    _assert_matmul_close(y.reshape(6, 7) - bias, want.reshape(6, 7) - bias, x.reshape(6, -1), dense)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_row_and_many_rows_agree(fmt: str) -> None:
    """Decode (T=1) and prefill (large T) run different loops; each row must not care."""
    from minillm.kernels.cpu_linear import FUSED_MAX_T
    from minillm.kernels.cpu_q4 import ONE_BY_ONE_BELOW

    assert max(ONE_BY_ONE_BELOW, FUSED_MAX_T) < 13, "13 rows must take the many-token loops"
    qt, packed, dense = _weights(fmt, 9, 2, seed=5)
    x = torch.randn(13, packed.cols, generator=torch.Generator().manual_seed(2))
    many = cpu.linear(x, packed)
    ones = torch.cat([cpu.linear(x[i : i + 1], packed) for i in range(13)])
    _assert_matmul_close(many, ones, x, dense)


def test_packing_keeps_gguf_bytes() -> None:
    """Q4_0/Q4_1/Q8_0/F16 repack without growing: the kernels stream the file's bytes. q4
    rows come in panels of 16, so a q4 matrix of fewer rows is padded up to 16."""
    for fmt in ("Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"):
        qt, packed, _ = _weights(fmt, 16, 4, seed=0)
        assert packed.nbytes == qt.nbytes, fmt
    for fmt in ("Q4_0", "Q4_1"):
        qt, packed, _ = _weights(fmt, 8, 4, seed=0)
        assert packed.nbytes == 2 * qt.nbytes and packed.rows == 8, fmt


def test_half_to_float_is_exact_on_every_fp16_value() -> None:
    """Both fp16 -> float32 paths (F16C and the integer one) equal numpy's widening on all
    65536 bit patterns: normals, subnormals, zeros, infinities; NaN stays NaN."""
    from numba import njit

    from minillm.kernels.cpu_numerics import half_to_float, half_to_float_portable

    @njit
    def widen_all(bits, portable):  # noqa: ANN001, ANN202
        out = np.empty(bits.shape[0], np.float32)
        for i in range(bits.shape[0]):
            out[i] = half_to_float_portable(bits[i]) if portable else half_to_float(bits[i])
        return out

    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    for portable in (False, True):
        got = widen_all(bits, portable)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_exp_f32_matches_exp() -> None:
    """The vectorizable exp: within 2e-7 of float64 exp over float32's normal range (every
    400th float32 from -87 to 88), and the edges: e^-inf = 0, e^0 = 1, NaN stays NaN,
    e^x = inf past 88.72 (and from 88.38, a little early)."""
    from numba import njit

    from minillm.kernels.cpu_numerics import exp_f32

    @njit
    def exp_all(a):  # noqa: ANN001, ANN202
        out = np.empty_like(a)
        for i in range(a.shape[0]):
            out[i] = exp_f32(a[i])
        return out

    minus_87, plus_88 = (np.array([v], np.float32).view(np.uint32)[0] for v in (-87, 88))
    xs = np.concatenate(
        [
            np.arange(0x80000000, minus_87, 400, dtype=np.uint32).view(np.float32),  # -0 to -87
            np.arange(0, plus_88, 400, dtype=np.uint32).view(np.float32),  # +0 up to 88
        ]
    )
    got, want = exp_all(xs).astype(np.float64), np.exp(xs.astype(np.float64))
    assert (np.abs(got - want) / want).max() < 2e-7
    edges = exp_all(np.array([-np.inf, -100, 0, 88.8, np.inf, np.nan], np.float32))
    assert edges[:5].tolist() == [0, 0, 1, np.inf, np.inf] and np.isnan(edges[5])


def test_roofline_kernels_compute_what_they_claim() -> None:
    """The roof measurements run real arithmetic: array_sum sums (exactly, on integers),
    fma_chains follows a = a * m + e (against numpy's float32 recurrence), int8_chains adds
    exactly what vpdpbusd adds, and all come back as positive rates."""
    from minillm.kernels import roofline

    a = np.arange(1000, dtype=np.float32)
    assert roofline.array_sum(a) == 499500
    out = np.zeros(3, np.float32)
    roofline.fma_chains(50, out)
    for c in range(3):
        m, e, acc = np.float32(0.999999), np.float32(1e-7) * np.float32(c + 1), np.float32(0)
        for _ in range(50):
            acc = np.float32(acc * m + e)
        assert out[c] == pytest.approx(192 * acc, rel=1e-5)  # 6 x 32 accumulators
    assert roofline.measure_fma_peak(1, steps=1000, reps=1) > 0
    assert roofline.measure_bandwidth(1, megabytes=8, reps=1) > 0
    counts = np.zeros(2, np.int64)
    roofline.int8_chains(50, counts)  # 6 chains x 16 lanes, each + 1 x 1 four times a round
    assert counts.tolist() == [6 * 16 * 4 * 50] * 2
    assert roofline.measure_int8_peak(1, steps=1000, reps=1) > 0


def test_q5_0_widens_to_int8_exactly() -> None:
    """Q5_0 reuses Q8_0's kernels: int8 codes q - 16 and the fp16 block scale, bit for bit."""
    qt, packed, _ = _weights("Q5_0", 6, 3, seed=1)
    assert (packed.kind, packed.block, packed.scale.dtype) == ("q8", 32, np.uint16)
    assert packed.codes.min() >= -16 and packed.codes.max() <= 15
    scale = packed.scale.view(np.float16).astype(np.float32)  # (rows, blocks)
    values = packed.codes.reshape(6, 3, 32).astype(np.float32) * scale[:, :, None]
    assert np.array_equal(values.reshape(6, 96), qt.dequantize())
    assert packed.nbytes == 6 * 3 * (32 + 2)  # 8.5 bits per weight in memory, 5.5 on disk


def test_linear_rejects_bad_input() -> None:
    qt, packed, dense = _weights("Q4_1", 4, 1, seed=0)
    with pytest.raises(ValueError, match="input features"):
        cpu.linear(torch.zeros(2, 33), packed)
    with pytest.raises(TypeError, match="prepare_linear"):
        cpu.linear(torch.zeros(2, 32), dense)
    with pytest.raises(TypeError, match="QuantTensor"):
        cpu.prepare_linear(np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        cpu.prepare_linear(quantize(np.zeros((2, 2, 32), np.float32), "Q8_0"))


# ----------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_matches_ref(fmt: str) -> None:
    qt, packed, dense = _weights(fmt, 13, 2, seed=7)
    ids = torch.tensor([12, 0, 5, 5, 7])
    assert torch.equal(cpu.embedding(ids, packed), ref.embedding(ids, dense))
    with pytest.raises(ValueError, match="token ids"):
        cpu.embedding(torch.tensor([13]), packed)


def test_tied_lm_head_reads_the_embedding_blocks() -> None:
    qt, packed, dense = _weights("Q8_0", 10, 2, seed=9)
    head = cpu.tied_lm_head(packed)
    assert head.codes is packed.codes
    x = torch.randn(3, packed.cols, generator=torch.Generator().manual_seed(0))
    _assert_matmul_close(cpu.linear(x, head), ref.linear(x, dense), x, dense)


# ----------------------------------------------------------------------------- elementwise
@FEW
@given(t=st.integers(1, 5), d=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_rms_norm_and_silu_mul(t: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, up = (torch.randn(t, d, generator=g) * 3 for _ in range(2))
    w = torch.randn(d, generator=g)
    torch.testing.assert_close(
        cpu.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(cpu.silu_mul(x, up), ref.silu_mul(x, up), rtol=1e-5, atol=1e-5)


@FEW
@given(
    t=st.integers(1, 5), h=st.integers(1, 4), half=st.integers(1, 40), seed=st.integers(0, 2**16)
)
def test_rope(t: int, h: int, half: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, 2 * half, generator=g)
    angles = torch.rand(t, half, generator=g) * 100
    cos, sin = torch.cos(angles), torch.sin(angles)
    torch.testing.assert_close(cpu.rope(x, cos, sin), ref.rope(x, cos, sin), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rope"):
        cpu.rope(x, cos[:, :-1], sin)


# ----------------------------------------------------------------------------- KV + attention
def _paged_setup(
    rng: np.random.Generator, lens: list[int], kvh: int, d: int, bs: int, extra_blocks: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches and block tables that hand out shuffled (non-contiguous) blocks."""
    need = [(n + bs - 1) // bs for n in lens]
    nb = sum(need) + extra_blocks
    order = rng.permutation(nb)
    width = max(need)
    tables = np.zeros((len(lens), width), dtype=np.int64)
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = order[used : used + k]
        tables[i, k:] = order[-1]  # padding: any valid block, masked by the length
        used += k
    kc = torch.from_numpy(rng.standard_normal((nb, bs, kvh, d)).astype(np.float32))
    vc = torch.from_numpy(rng.standard_normal((nb, bs, kvh, d)).astype(np.float32))
    return kc, vc, torch.from_numpy(tables)


@FEW
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    kvh=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    d=st.sampled_from([8, 16, 64]),
    bs=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_attention_decode_paged(
    lens: list[int], kvh: int, group: int, d: int, bs: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    kc, vc, tables = _paged_setup(rng, lens, kvh, d, bs)
    q = torch.from_numpy(rng.standard_normal((len(lens), kvh * group, d)).astype(np.float32))
    ctx = torch.tensor(lens)
    got = cpu.attention_decode_paged(q, kc, vc, tables, ctx, d**-0.5)
    want = ref.attention_decode_paged(q, kc, vc, tables, ctx, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@FEW
@given(
    context=st.integers(1, 60),
    new=st.integers(1, 60),
    kvh=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    bs=st.sampled_from([2, 16]),
    seed=st.integers(0, 2**16),
)
def test_attention_prefill(
    context: int, new: int, kvh: int, group: int, bs: int, seed: int
) -> None:
    """n new tokens at the end of the context: a cached prefix, earlier chunks, then these."""
    new = min(new, context)
    rng = np.random.default_rng(seed)
    kc, vc, tables = _paged_setup(rng, [context], kvh, 16, bs)
    q = torch.from_numpy(rng.standard_normal((new, kvh * group, 16)).astype(np.float32))
    got = cpu.attention_prefill(q, kc, vc, tables[0], context, 0.25)
    want = ref.attention_prefill(q, kc, vc, tables[0], context, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attention_large_scores_stay_finite() -> None:
    """Scores of ~1e4 would overflow a naive exp; the online max keeps softmax finite."""
    rng = np.random.default_rng(0)
    kc, vc, tables = _paged_setup(rng, [40], 1, 8, 4)
    q = torch.full((1, 2, 8), 300.0)
    got = cpu.attention_decode_paged(q, kc, vc, tables, torch.tensor([40]), 1.0)
    want = ref.attention_decode_paged(q, kc, vc, tables, torch.tensor([40]), 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attention_rejects_blocks_outside_the_cache() -> None:
    rng = np.random.default_rng(0)
    kc, vc, tables = _paged_setup(rng, [10], 1, 8, 4)
    q = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="outside the KV cache"):
        cpu.attention_decode_paged(q, kc, vc, tables + 100, torch.tensor([10]), 1.0)
    with pytest.raises(ValueError, match="context length"):
        cpu.attention_decode_paged(q, kc, vc, tables, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="new tokens"):
        cpu.attention_prefill(torch.zeros(11, 1, 8), kc, vc, tables[0], 10, 1.0)


def test_store_kv_writes_in_place() -> None:
    rng = np.random.default_rng(1)
    kc = torch.zeros(6, 4, 2, 8)
    vc = torch.zeros(6, 4, 2, 8)
    k, v = (torch.from_numpy(rng.standard_normal((5, 2, 8)).astype(np.float32)) for _ in "kv")
    slots = torch.from_numpy(rng.permutation(24)[:5])
    kc_ref, vc_ref = kc.clone(), vc.clone()
    cpu.store_kv(k, v, kc, vc, slots)
    ref.store_kv(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    with pytest.raises(ValueError, match="outside the KV cache"):
        cpu.store_kv(k[:1], v[:1], kc, vc, torch.tensor([24]))


# ----------------------------------------------------------------------------- whole models
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "List three colors:",
]


def _greedy_tokens(model: str, backend: str, max_tokens: int = 32) -> list[list[int]]:
    from minillm import LLM, SamplingParams

    llm = LLM(model, backend=backend)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_bundled_model_greedy_tokens_equal_ref(bundled_gguf_path, one_thread) -> None:  # noqa: ANN001
    """SmolLM2 Q4_1 (+ a Q8_0 tied embedding): 4 prompts x 32 greedy tokens, batched."""
    assert _greedy_tokens(str(bundled_gguf_path), "cpu") == _greedy_tokens(
        str(bundled_gguf_path), "ref"
    )


def test_bundled_model_logits_close_to_ref(bundled_gguf_path, one_thread) -> None:  # noqa: ANN001
    """Prefill (T > 1 kernels) then one decode step (T = 1 kernels) through shuffled blocks."""
    from minillm.kv.cache import KVCache
    from minillm.loader import load_model
    from minillm.model.batch import ForwardBatch, PrefillChunk

    none = torch.zeros(0, dtype=torch.long)
    logits = {}
    for backend in ("ref", "cpu"):
        m = load_model(str(bundled_gguf_path), backend)
        ids = m.tokenizer.encode("Paged attention reads the KV cache through block tables.")
        n, cfg = len(ids), m.config
        cache = KVCache(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim)
        table = torch.tensor([2, 0, 3, 1])  # shuffled blocks
        slots = table[torch.arange(n + 1) // 16] * 16 + torch.arange(n + 1) % 16
        prefill = ForwardBatch(
            torch.tensor(ids), torch.arange(n), slots[:n], 0, none.reshape(0, 0), none,
            [PrefillChunk(0, n, n, table)], torch.arange(n),
        )  # fmt: skip
        first = m.model.forward(prefill, cache.k, cache.v)
        token = int(first[-1].argmax())
        decode = ForwardBatch(
            torch.tensor([token]), torch.tensor([n]), slots[n:], 1, table[None],
            torch.tensor([n + 1]), [], torch.tensor([0]),
        )  # fmt: skip
        logits[backend] = (first, m.model.forward(decode, cache.k, cache.v))
    for got, want in zip(logits["cpu"], logits["ref"], strict=True):
        diff = (got - want).abs().max().item()
        assert diff < 5e-4, f"max |logit difference| {diff} (logits reach {want.abs().max():.0f})"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_hf_model_greedy_tokens_equal_ref(tmp_path, arch: str) -> None:  # noqa: ANN001
    """Random F32 safetensors weights; qwen2 adds q/k/v biases and tied embeddings. Runs on
    all threads: the whole engine in parallel at least once."""
    from minillm.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / arch, arch=arch)
    assert _greedy_tokens(str(folder), "cpu", 16) == _greedy_tokens(str(folder), "ref", 16)


def _decode_both_ways(
    model_path: str, swap_after_first: bool = False, sequences: int = 3, to_q4: bool = False
) -> tuple:
    """Three sequences prefilled into shuffled blocks, then one decode step of the first
    ``sequences`` run twice from the same cache: op by op, and fused (one compiled call per
    layer). ``swap_after_first``: run the fused step once, then replace a weight of layer 0, so
    that the comparison runs on the new weight (the fused path caches each layer's arrays).
    ``to_q4``: first requantize an F32 model's layer matrices to Q4_1."""
    from minillm.kv.cache import KVCache
    from minillm.loader import load_model
    from minillm.model.batch import ForwardBatch, PrefillChunk

    m = load_model(model_path, "cpu")
    if to_q4:
        for layer in m.model.layers:
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                dense = getattr(layer, name).codes  # F32: the values themselves
                setattr(layer, name, cpu.prepare_linear(quantize(dense, "Q4_1")))
    cfg, bs = m.config, 4
    cache = KVCache(cfg.num_layers, 12, bs, cfg.num_kv_heads, cfg.head_dim)
    tables = torch.tensor([[5, 1, 9, 0], [2, 7, 3, 11], [4, 10, 6, 8]])
    lengths, tokens = [9, 13, 3], []
    for row, n in enumerate(lengths):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(row))
        slots = tables[row][torch.arange(n) // bs] * bs + torch.arange(n) % bs
        none = torch.zeros(0, dtype=torch.long)
        chunk = PrefillChunk(0, n, n, tables[row])
        batch = ForwardBatch(ids, torch.arange(n), slots, 0, none.reshape(0, 0), none, [chunk],
                             torch.tensor([n - 1]))  # fmt: skip
        tokens.append(int(m.model.forward(batch, cache.k, cache.v)[0].argmax()))
    n, rows = torch.tensor(lengths)[:sequences], torch.arange(sequences)
    decode = ForwardBatch(
        torch.tensor(tokens[:sequences]), n, tables[rows, n // bs] * bs + n % bs, sequences,
        tables[:sequences], n + 1, [], rows,
    )  # fmt: skip
    if swap_after_first:
        m.model.forward(decode, [c.clone() for c in cache.k], [c.clone() for c in cache.v])
        layer = m.model.layers[0]
        layer.w_up, layer.ffn_norm = layer.w_gate, layer.attn_norm  # same shapes, new values
    results = []
    for fused in (False, True):
        k, v = [c.clone() for c in cache.k], [c.clone() for c in cache.v]
        m.model.fused_decode = fused
        results.append((m.model.forward(decode, k, v), k, v))
    return results


@pytest.mark.parametrize("sequences", [1, 3])
@pytest.mark.parametrize("which", ["bundled", "tiny-qwen2", "tiny-qwen2-q4"])
def test_fused_decode_equals_op_by_op(
    which: str, sequences: int, bundled_gguf_path, tmp_path
) -> None:  # noqa: ANN001
    """The fused layer runs the same kernels in the same order: logits and the K/V it writes
    are bit-for-bit the op-by-op ones (bundled: Q4_1 + Q8_0; qwen2: F32 with q/k/v biases, and
    requantized to Q4_1), for one sequence and for three."""
    from minillm.testing import make_tiny_model

    path = bundled_gguf_path if which == "bundled" else make_tiny_model(tmp_path, arch="qwen2")
    (want, want_k, want_v), (got, got_k, got_v) = _decode_both_ways(
        str(path), sequences=sequences, to_q4=which.endswith("q4")
    )
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_k + got_v, want_k + want_v, strict=True))


@pytest.mark.parametrize("which", ["bundled", "tiny-qwen2-q4"])
def test_fused_decode_equals_op_by_op_with_int8_activations(
    which: str, bundled_gguf_path, tmp_path
) -> None:  # noqa: ANN001
    """The same, bit for bit, when the matmuls quantize their inputs to int8 (cpu_a8)."""
    from minillm.testing import make_tiny_model

    path = bundled_gguf_path if which == "bundled" else make_tiny_model(tmp_path, arch="qwen2")
    with cpu.activations("int8"):
        (want, want_k, want_v), (got, got_k, got_v) = _decode_both_ways(
            str(path), to_q4=which.endswith("q4")
        )
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_k + got_v, want_k + want_v, strict=True))


def test_fused_decode_sees_a_replaced_weight(tmp_path) -> None:  # noqa: ANN001
    from minillm.testing import make_tiny_model

    path = make_tiny_model(tmp_path)
    (want, _, _), (got, _, _) = _decode_both_ways(str(path), swap_after_first=True)
    assert torch.equal(got, want)


def test_decoder_layers_rejects_a_batch_with_prefills(tmp_path) -> None:  # noqa: ANN001
    from minillm.loader import load_model
    from minillm.model.batch import ForwardBatch, PrefillChunk
    from minillm.testing import make_tiny_model

    m = load_model(str(make_tiny_model(tmp_path)), "cpu")
    none = torch.zeros(0, dtype=torch.long)
    batch = ForwardBatch(torch.tensor([1, 2]), torch.arange(2), torch.arange(2), 0,
                         none.reshape(0, 0), none, [PrefillChunk(0, 2, 2, torch.tensor([0]))],
                         torch.tensor([1]))  # fmt: skip
    x = torch.zeros(2, m.config.hidden_size)
    with pytest.raises(ValueError, match="decode-only"):
        cpu.decoder_layers(x, m.model.layers, [], [], batch, x, x, 1e-5, 1, 1.0)


def test_engine_chunked_prefill_and_prefix_cache_match_ref(tmp_path, one_thread) -> None:  # noqa: ANN001
    """Prefill chunks that end mid-context and prompts that reuse cached blocks, as ref does."""
    from minillm import LLM, SamplingParams
    from minillm.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny")
    shared = "KV cache, paged attention, continuous batching and quantization. " * 3
    prompts = [shared + "The quick brown fox", shared + "def add(a, b):", "Large language"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("ref", "cpu"):
        llm = LLM(str(folder), backend=backend, block_size=4, max_num_batched_tokens=16)
        first = llm.generate(prompts[:1], params)  # fills the prefix cache
        rest = llm.generate(prompts, params)
        assert rest[1].metrics.num_cached_tokens > 0
        tokens[backend] = [o.outputs[0].token_ids for o in first + rest]
    assert tokens["cpu"] == tokens["ref"]


def test_bench_bytes_per_token_match_the_gguf(bundled_gguf_path, one_thread) -> None:  # noqa: ANN001
    """The roofline's denominator, counted from the packed weights, equals the file's tensors:
    every Q4_1 matrix, the tied Q8_0 table (read whole as lm_head, one row as embedding), norms."""
    import sys
    from pathlib import Path

    from minillm.formats.gguf import GGUFFile
    from minillm.loader import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_kernels

    tensors = GGUFFile(bundled_gguf_path).tensors
    embed = tensors["token_embd.weight"]
    matrices = sum(
        t.nbytes for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2
    )
    norms = sum(t.nbytes for t in tensors.values() if len(t.shape) == 1)
    want = matrices + embed.nbytes + embed.nbytes // embed.shape[0] + norms
    model = load_model(str(bundled_gguf_path), "cpu").model
    assert bench_kernels.decode_bytes_per_token(model) == want
    assert bench_kernels.decode_bytes_per_token(model, fp32=True) > 5 * want


def test_auto_picks_cpu_without_a_gpu(monkeypatch) -> None:  # noqa: ANN001
    """'auto' is cuda only with a real GPU, else the Numba backend; MINILLM_BACKEND overrides."""
    from minillm import kernels

    monkeypatch.delenv("MINILLM_BACKEND", raising=False)
    monkeypatch.setattr(kernels, "cuda_available", lambda: False)
    assert kernels.resolve_backend_name("auto") == "cpu"
    assert kernels.get_backend() is cpu
    monkeypatch.setenv("MINILLM_BACKEND", "ref")
    assert kernels.resolve_backend_name("auto") == "ref"
    monkeypatch.setenv("MINILLM_BACKEND", "auto")
    assert kernels.resolve_backend_name("auto") == "cpu"
    monkeypatch.setenv("MINILLM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        kernels.resolve_backend_name("auto")


def test_warmup_runs_the_engine_on_cpu(tmp_path, capsys) -> None:  # noqa: ANN001
    from minillm.kernels import warmup
    from minillm.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "llama", "llama", seed=5)
    assert warmup.main([str(path)]) == 0
    assert "cpu kernels ready" in capsys.readouterr().out
