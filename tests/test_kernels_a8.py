"""The cpu backend's int8 activations (W4A8/W8A8, kernels/cpu_a8.py) against their reference.

The reference (``ref.linear_int8_activations``) quantizes x by the same rule and multiplies the
exact codes in float64, so a kernel may differ from it only by float32 rounding of the scales
and of the sum over blocks: the bound is 1e-5 * sum_k |x^_k * w_k| per output, as for the fp32
kernels (one wrong integer product, or one activation rounded the other way, is far above it).
Where every scale is 1 the result is an integer, and the kernels must produce it exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.formats.blocks import quantize
from minillm.kernels import cpu, cpu_a8, ref
from minillm.kernels.cpu_vnni import HAS_VNNI

QUANTIZED = ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q6_K"]
FEW = settings(max_examples=10, deadline=None)


def _packed(fmt: str, rows: int, cols: int, seed: int) -> tuple[cpu.PackedWeight, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qt = quantize(w, fmt)
    with cpu.activations("int8"):
        packed = cpu.prepare_linear(qt)
    return packed, ref.prepare_linear(qt)


def _x(t: int, cols: int, seed: int) -> torch.Tensor:
    x = np.random.default_rng(seed).standard_normal((t, cols)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, as real activations have: its block's scale grows
    return torch.from_numpy(x)


def _x_hat(x: torch.Tensor) -> torch.Tensor:
    q, d = ref.quantize_activations(x)
    return (q.float().reshape(*d.shape, 32) * d[..., None]).reshape(x.shape)


# ----------------------------------------------------------------------------- quantizer
def test_quantizer_matches_the_reference_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 128)).astype(np.float32) * np.float32(3)
    x[1, :32] = 0  # an all-zero block: scale 0, codes 0
    x[2, 32:64] = np.arange(32, dtype=np.float32) - 15.5  # halves: round-half-even decides
    x[3, 64] = 1e6  # one huge value flattens its block to 0 and +-127
    x[4, 96] = -50  # the largest magnitude is negative: the scale takes its absolute value
    xq, xd, xs, sum16 = cpu_a8.quantize_activations(x, 8)
    q, d = ref.quantize_activations(torch.from_numpy(x))
    assert xq.shape == (8, 128) and not xq[5:].any()  # padded to a multiple of 8 with zeros
    np.testing.assert_array_equal(xq[:5], q.numpy())
    np.testing.assert_array_equal(xd[:5], d.numpy())
    halves = q.numpy().astype(np.int32).reshape(5, 8, 16).sum(-1)
    np.testing.assert_array_equal(sum16[:5], halves)
    np.testing.assert_allclose(xs[:5], d.numpy() * halves.reshape(5, 4, 2).sum(-1), rtol=1e-6)
    assert (np.abs(xq) <= 127).all() and xd[1, 0] == 0 and not xq[1, :32].any()
    assert xq[4, 96] == -127


def test_quantizer_on_many_tokens_splits_rows_over_threads_alike() -> None:
    """From PARALLEL_QUANTIZE_FROM tokens the rows go to the threads: same codes and scales."""
    rows = cpu_a8.PARALLEL_QUANTIZE_FROM + 3
    x = np.random.default_rng(1).standard_normal((rows, 96)).astype(np.float32)
    xq, xd, _, _ = cpu_a8.quantize_activations(x, 8)
    q, d = ref.quantize_activations(torch.from_numpy(x))
    assert xq.shape[0] == -(-rows // 8) * 8
    np.testing.assert_array_equal(xq[:rows], q.numpy())
    np.testing.assert_array_equal(xd[:rows], d.numpy())


def test_reference_quantizer_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        ref.quantize_activations(torch.zeros(2, 40))


# ----------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("fmt", QUANTIZED)
@FEW
@given(
    t=st.sampled_from([1, 2, 3, 4, 8, 9, 20]),  # one by one (< 4), groups of 8, partial groups
    rows=st.integers(1, 37),  # past two 16-row panels; padding rows are never stored
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_the_int8_reference(
    fmt: str, t: int, rows: int, blocks: int, seed: int
) -> None:
    cols = blocks * (256 if fmt.endswith("_K") else 64)
    packed, dense = _packed(fmt, rows, cols, seed)
    assert packed.int8_activations
    x = _x(t, cols, seed + 1)
    y = cpu.linear(x, packed)
    want = ref.linear_int8_activations(x, dense)
    bound = 1e-5 * (_x_hat(x).abs() @ dense.abs().T) + 1e-30
    excess = ((y - want).abs() / bound).max().item()
    assert excess <= 1.0, f"{fmt}: error up to {excess:.2f}x the fp32 rounding bound"


@pytest.mark.parametrize("fmt", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("t", [1, 9])
def test_integer_sums_are_exact(fmt: str, t: int) -> None:
    """Weights with scale 1 and activations whose blocks reach +-127 (scale 1): every product
    is an integer, so the result must be the exact integer dot product."""
    rng = np.random.default_rng(7)
    low, high = (-8, 7) if fmt == "Q4_0" else (-127, 127)
    w = rng.integers(low, high + 1, size=(20, 128)).astype(np.float32)
    w[:, ::32] = low if fmt == "Q4_0" else high  # each block's max |w| sets scale 1
    x = rng.integers(-127, 128, size=(t, 128)).astype(np.float32)
    x[:, ::32] = 127
    with cpu.activations("int8"):
        packed = cpu.prepare_linear(quantize(w, fmt))
    y = cpu.linear(torch.from_numpy(x), packed).numpy()
    np.testing.assert_array_equal(y, (x.astype(np.int64) @ w.astype(np.int64).T).astype(np.float32))


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_one_token_and_a_batch_agree_bit_for_bit(fmt: str) -> None:
    """Token t's row does not depend on the other tokens of the batch (the same kernel code
    runs per token and per group), so batched and one-at-a-time decoding give the same logits."""
    cols = 256 if fmt.endswith("_K") else 128
    packed, _ = _packed(fmt, 40, cols, 3)
    x = _x(11, cols, 4)
    batched = cpu.linear(x, packed)
    for i in range(11):
        assert torch.equal(cpu.linear(x[i : i + 1], packed)[0], batched[i])


def test_int8_embedding_reads_the_panels() -> None:
    """A Q8_0 table in the int8 layout (16-row panels) still looks up exact rows."""
    packed, dense = _packed("Q8_0", 37, 128, 5)
    assert packed.kind == "q8_panels"
    ids = torch.tensor([0, 15, 16, 36, 5])
    assert torch.equal(cpu.embedding(ids, packed), dense[ids])


def test_fp32_mode_keeps_the_exact_path() -> None:
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    with cpu.activations("fp32"):
        packed = cpu.prepare_linear(quantize(w, "Q8_0"))
    assert packed.kind == "q8" and not packed.int8_activations
    with pytest.raises(ValueError, match="activations must be one of int8, fp32"):
        with cpu.activations("int4"):
            pass


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI (the portable path runs)")
def test_kernels_use_vpdpbusd() -> None:
    """The integer dot product is one VNNI instruction, in the compiled kernels themselves."""
    code = (
        "import numpy as np\n"
        "from minillm.kernels import cpu_a8\n"
        "from minillm.formats.blocks import quantize\n"
        "from minillm.kernels import cpu\n"
        "w = cpu.prepare_linear(quantize(np.ones((16, 64), np.float32), 'Q4_1'))\n"
        "x = np.ones((1, 64), np.float32); out = np.zeros((1, 16), np.float32)\n"
        "xq, xd, xs, _ = cpu_a8.quantize_activations(x, 1)\n"
        "cpu_a8.q4_a8_one(xq, xd, xs, 0, w.codes, w.scale, w.offset, w.offset_mult, out)\n"
        "asm = ''.join(cpu_a8.q4_a8_one.inspect_asm().values())\n"
        "print(asm.count('vpdpbusd'), asm.count('vpermb'))\n"
    )
    counts = _fresh_process(code, {}).split()
    assert int(counts[0]) >= 8, f"{counts[0]} vpdpbusd in q4_a8_one: VNNI is not used"


def _fresh_process(code: str, env: dict[str, str], cache: str | None = None) -> str:
    """Run code in a new interpreter with its own Numba cache (compiled, not loaded)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        full_env = dict(os.environ, NUMBA_CACHE_DIR=cache or tmp, **env)
        done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_portable_path_equals_the_vnni_path(tmp_path) -> None:  # noqa: ANN001
    """MINILLM_NO_VNNI=1 compiles the pre-VNNI paths instead of vpdpbusd (AVX2's vpmaddubsw for
    4-bit codes, plain LLVM integer arithmetic for 8-bit ones): the integer sums, hence the
    results, must be identical bit for bit."""
    code = (
        "import numpy as np, torch\n"
        "from minillm.formats.blocks import quantize\n"
        "from minillm.kernels import cpu\n"
        "from minillm.kernels.cpu_vnni import HAS_VNNI\n"
        "rng = np.random.default_rng(11)\n"
        "x = torch.from_numpy(rng.standard_normal((9, 256)).astype(np.float32))\n"
        "ys = []\n"
        "for fmt in ('Q4_1', 'Q6_K'):\n"
        "    w = cpu.prepare_linear(quantize(rng.standard_normal((20, 256)).astype(np.float32), fmt))\n"
        "    ys += [cpu.linear(x, w), cpu.linear(x[:1], w)]\n"
        "np.save({path!r}, np.concatenate([y.numpy().ravel() for y in ys]))\n"
        "print(HAS_VNNI)\n"
    )
    here, portable = tmp_path / "here.npy", tmp_path / "portable.npy"
    _fresh_process(code.format(path=str(here)), {}, cache=os.environ.get("NUMBA_CACHE_DIR"))
    assert _fresh_process(code.format(path=str(portable)), {"MINILLM_NO_VNNI": "1"}) == "False"
    np.testing.assert_array_equal(np.load(here), np.load(portable))


# ----------------------------------------------------------------------------- whole model
def test_bundled_model_perplexity_within_one_percent_of_fp32(one_thread) -> None:  # noqa: ANN001
    """Quantizing every matmul input to 8 bits costs the bundled model under 1% perplexity on
    the stdlib corpus (2048 tokens in windows of 512), against the fp32-activation path."""
    from minillm.compress.evaluate import perplexity, stdlib_docs_corpus
    from minillm.loader import load_model

    models = {mode: load_model("smollm2", "cpu", activations=mode) for mode in ("fp32", "int8")}
    ids = models["fp32"].tokenizer.encode(stdlib_docs_corpus())
    ppl = {mode: perplexity(m.model, ids, max_tokens=2048) for mode, m in models.items()}
    assert ppl["int8"].num_tokens == ppl["fp32"].num_tokens > 2000
    change = ppl["int8"].delta_pct(ppl["fp32"])
    assert abs(change) < 1.0, f"int8 activations change perplexity by {change:+.2f}%"
    assert ppl["int8"].value != ppl["fp32"].value  # two different paths really ran


def test_bundled_model_batched_equals_one_at_a_time(one_thread) -> None:  # noqa: ANN001
    """Greedy tokens of 4 prompts decoded together equal each decoded alone: a token's int8
    blocks depend on its own activations only."""
    from minillm import LLM, SamplingParams

    llm = LLM("smollm2", backend="cpu")
    assert llm.loaded.model.layers[0].wq.int8_activations  # the default for quantized weights
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Colors:"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_activations_option_is_checked_early() -> None:
    from minillm import LLM

    with pytest.raises(ValueError, match="activations must be one of int8, fp32, got 'int4'"):
        LLM("smollm2", backend="cpu", activations="int4")
    with pytest.raises(ValueError, match="the ref backend computes in fp32 only"):
        LLM("smollm2", backend="ref", activations="int8")
