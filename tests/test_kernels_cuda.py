"""The cuda backend (numba.cuda kernels) against the ref backend, op by op and end to end.

Without a GPU the kernels run in numba's simulator, which must be switched on *before numba is
first imported* (NUMBA_ENABLE_CUDASIM=1). Other test modules may already have imported numba in
this pytest process, and setting the variable here would leak into them, so the checks run in
one child process started with the variable set: `python tests/test_kernels_cuda.py OUT NAMES`.
Each check below becomes one parametrized test that reports the child's result (and traceback).

With a real GPU the same checks also run in-process, for real (`cuda` marker), plus a speed
test; both skip with a reason when numba.cuda sees no GPU.

The simulator runs every CUDA thread as a Python thread, so shapes are tiny (8-64) and the whole
file takes about two minutes on an idle 2-core machine. The resident path's checks live in
cuda_resident_checks.py and run here with the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_resident_checks import RESIDENT_CHECKS

CHILD_TIMEOUT_S = 900
ATOL, RTOL = 1e-4, 1e-5  # fp32, different summation orders

# ============================================================================ helpers (any process)


def _backends():  # noqa: ANN202 - (cuda module, ref module)
    from minillm.kernels import get_backend

    return get_backend("cuda"), get_backend("ref")


def _launch_configs() -> list:
    """Every kernel is checked with the simulator's launch shapes and with the GPU's."""
    cu, _ = _backends()
    return [cu.SIM_LAUNCH, cu.GPU_LAUNCH]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _quant(shape: tuple[int, int], fmt: str, seed: int):  # noqa: ANN202 - QuantTensor
    from minillm.formats.blocks import QuantTensor

    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return QuantTensor.from_array(values, fmt)


def _paged_cache(seed: int, nb: int = 10, bs: int = 4, kvh: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)


# ============================================================================ the checks


def check_fp16_scales_decode_exactly() -> None:
    """half_to_float equals numpy's conversion on every 5th fp16 bit pattern: all exponents
    (subnormals included) and both signs, in a second."""
    from numba import cuda

    from minillm.kernels.cuda_quant import half_to_float

    cu, _ = _backends()
    bits = np.arange(0, 1 << 16, 5, dtype=np.uint16)
    finite = bits[np.isfinite(bits.view(np.float16))]
    expected = finite.view(np.float16).astype(np.float32)
    lo, hi = (finite & 0xFF).astype(np.int64), (finite >> 8).astype(np.int64)
    if cu.SIMULATED:  # the simulator calls device functions like Python functions
        got = np.array([half_to_float(a, b) for a, b in zip(lo, hi, strict=True)], np.float32)
    else:  # on a GPU a device function runs only inside a kernel

        @cuda.jit
        def convert(lo, hi, out):  # noqa: ANN001
            i = cuda.grid(1)
            if i < out.size:
                out[i] = half_to_float(lo[i], hi[i])

        out = cuda.device_array(len(finite), dtype=np.float32)
        convert[-(-len(finite) // 256), 256](cuda.to_device(lo), cuda.to_device(hi), out)
        got = out.copy_to_host()
    np.testing.assert_array_equal(got, expected)


def check_linear_matvec_every_format() -> None:
    """Decode-shaped (T=1) and batched quantized linears, with and without bias; the GPU's
    launch shapes (a warp per row, a shared-memory tree) on two formats."""
    cu, ref = _backends()
    g = torch.Generator().manual_seed(1)
    cases = [(cu.SIM_LAUNCH, fmt) for fmt in ("F32", "Q8_0", "Q4_0", "Q4_1")]
    cases += [(cu.GPU_LAUNCH, "Q4_1"), (cu.GPU_LAUNCH, "F32")]
    for i, (cfg, fmt) in enumerate(cases):
        w = _quant((24, 64) if cfg is cu.SIM_LAUNCH else (6, 64), fmt, seed=i)
        w_cu, w_ref = cu.prepare_linear(w), ref.prepare_linear(w)
        assert w_cu.format == fmt  # kept in its own format on the device
        bias = torch.randn(w.shape[0], generator=g)
        with cu.use_launch_config(cfg):
            x = torch.randn(1, 64, generator=g)
            what = f"{fmt} lanes={cfg.lanes}"
            _close(cu.linear(x, w_cu), ref.linear(x, w_ref), what)
            if fmt != "F32":  # fp32 weights with T > 1 take the tiled matmul
                x = torch.randn(3, 64, generator=g)
                _close(cu.linear(x, w_cu, bias), ref.linear(x, w_ref, bias), what + " T=3")


def check_linear_tiled_matmul() -> None:
    """fp32 weights, T > 1: shapes that are not multiples of the tile or of the K step."""
    cu, ref = _backends()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g)
    bias = torch.randn(24, generator=g)
    for cfg in _launch_configs():
        with cu.use_launch_config(cfg):
            for n_tok in (2, 11):
                x = torch.randn(n_tok, 40, generator=g)
                _close(cu.linear(x, w, bias), ref.linear(x, w, bias), f"tiled T={n_tok} {cfg}")


def check_linear_reads_wider_formats_as_fp32() -> None:
    """F16/BF16/K-quants/Q5_0 have no kernel: they are widened to F32 at load and still agree."""
    cu, ref = _backends()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    for fmt in ("F16", "Q4_K", "Q5_0"):
        w = _quant((8, 256), fmt, seed=3)
        w_cu = cu.prepare_linear(w)
        assert w_cu.format == "F32"
        _close(cu.linear(x, w_cu), ref.linear(x, ref.prepare_linear(w)), fmt)


def check_embedding_every_format() -> None:
    cu, ref = _backends()
    ids = torch.tensor([5, 0, 39, 5])
    for i, fmt in enumerate(["F32", "Q8_0", "Q4_0", "Q4_1"]):
        table = _quant((40, 64), fmt, seed=10 + i)
        got = cu.embedding(ids, cu.prepare_embedding(table))
        _close(got, ref.embedding(ids, ref.prepare_embedding(table)), fmt)


def check_rms_norm() -> None:
    cu, ref = _backends()
    g = torch.Generator().manual_seed(4)
    for cfg in _launch_configs():
        with cu.use_launch_config(cfg):
            for dim in (64, 40):
                x = torch.randn(3, dim, generator=g) * 3
                w = torch.randn(dim, generator=g)
                _close(cu.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), f"d={dim} {cfg}")


def check_rope_and_silu_mul() -> None:
    cu, ref = _backends()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 16, generator=g)
    angles = torch.rand(3, 8, generator=g) * 6
    cos, sin = torch.cos(angles), torch.sin(angles)
    _close(cu.rope(q, cos, sin), ref.rope(q, cos, sin), "rope")
    gate, up = torch.randn(3, 40, generator=g) * 4, torch.randn(3, 40, generator=g)
    _close(cu.silu_mul(gate, up), ref.silu_mul(gate, up), "silu_mul")


def check_store_kv_cpu_and_device_caches() -> None:
    """Host caches are written in place; device caches (the engine's, on this backend) too."""
    from numba import cuda

    cu, ref = _backends()
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    slots = torch.tensor([5, 13, 30])  # blocks 1, 3, 7
    kc_ref, vc_ref = _paged_cache(seed=7)
    kc_cu, vc_cu = kc_ref.clone(), vc_ref.clone()
    kd, vd = cuda.to_device(kc_ref.numpy()), cuda.to_device(vc_ref.numpy())
    ref.store_kv(k, v, kc_ref, vc_ref, slots)
    cu.store_kv(k, v, kc_cu, vc_cu, slots)
    cu.store_kv(k, v, kd, vd, slots)
    assert torch.equal(kc_cu, kc_ref) and torch.equal(vc_cu, vc_ref)
    assert torch.equal(torch.from_numpy(kd.copy_to_host()), kc_ref)
    assert torch.equal(torch.from_numpy(vd.copy_to_host()), vc_ref)


def check_decode_attention_paged() -> None:
    """Three sequences of different lengths, padded block tables, GQA (4 query heads, 2 KV)."""
    from numba import cuda

    cu, ref = _backends()
    kc, vc = _paged_cache(seed=8)
    tables = torch.tensor([[3, 1, 6, 8, 2, 9], [2, 0, 0, 0, 0, 0], [7, 4, 5, 0, 0, 0]])
    lens = torch.tensor([21, 1, 9])
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(9))
    expected = ref.attention_decode_paged(q, kc, vc, tables, lens, 0.25)
    for cfg in _launch_configs():
        with cu.use_launch_config(cfg):
            _close(cu.attention_decode_paged(q, kc, vc, tables, lens, 0.25), expected, str(cfg))
    kd, vd = cuda.to_device(kc.numpy()), cuda.to_device(vc.numpy())
    _close(cu.attention_decode_paged(q, kd, vd, tables, lens, 0.25), expected, "device cache")


def check_prefill_attention_paged() -> None:
    """New tokens after a cached prefix (causal mask offset), and a prompt with no prefix."""
    cu, ref = _backends()
    kc, vc = _paged_cache(seed=11)
    table = torch.tensor([6, 2, 9, 4])
    g = torch.Generator().manual_seed(12)
    for n_new, ctx in ((6, 13), (11, 11)):
        q = torch.randn(n_new, 4, 16, generator=g)
        expected = ref.attention_prefill(q, kc, vc, table, ctx, 0.25)
        for cfg in _launch_configs():
            with cu.use_launch_config(cfg):
                got = cu.attention_prefill(q, kc, vc, table, ctx, 0.25)
                _close(got, expected, f"n={n_new} ctx={ctx} {cfg}")


def check_bad_input_is_named() -> None:
    cu, _ = _backends()
    w = cu.prepare_linear(_quant((8, 64), "Q8_0", seed=0))
    kc, vc = _paged_cache(seed=0)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: cu.linear(torch.zeros(1, 32), w), "features"),
        (lambda: cu.embedding(torch.tensor([8]), w), "token ids"),
        (lambda: cu.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-5), "weight has 4"),
        (
            lambda: cu.attention_decode_paged(
                torch.zeros(1, 4, 8), kc, vc, torch.tensor([[0]]), torch.tensor([1]), 1.0
            ),
            "head dim",
        ),
        (
            lambda: cu.store_kv(
                torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), kc, vc, torch.tensor([999])
            ),
            "block ids",
        ),
        (lambda: cu.make_matvec("Q6_K", 32, 4), "no matvec kernel"),
    ]
    for call, words in cases:
        try:
            call()
        except (ValueError, TypeError) as e:
            assert words in str(e), f"{words!r} not in {e!r}"
        else:
            raise AssertionError(f"no error for a call that should mention {words!r}")


def _greedy_tokens(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:  # noqa: ANN001
    from minillm.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [list(done[f"r{i}"]) for i in range(len(prompts))]


def _tiny_model_dir(name: str = "tiny_llama_cuda", arch: str = "llama", **shape: int) -> Path:
    """A tiny random Llama (or Qwen2) in the run's temp folder, made once; `shape` overrides
    HF config fields (hidden_size=32, ...)."""
    from minillm.testing import make_tiny_model

    folder = Path(os.environ.get("MINILLM_CUDA_TEST_TMP", "/tmp")) / name
    if not (folder / "config.json").exists():
        make_tiny_model(folder, arch, **shape)
    return folder


def check_tiny_model_greedy_matches_ref() -> None:
    """The 2-layer fp32 llama: batched (tiled matmul, paged decode of 2 sequences) and alone
    (matvec decode) on cuda, against ref, token for token. Block size 4 spreads every prompt
    over several KV blocks."""
    from minillm import LLM

    folder = str(_tiny_model_dir())
    prompts = ["The quick brown fox", "KV cache"]
    opts = dict(block_size=4, num_kv_blocks=24)
    cu_llm, ref_llm = LLM(folder, backend="cuda", **opts), LLM(folder, backend="ref", **opts)
    cu_llm.engine.runner.model.use_resident = False  # the lessons' path: one op at a time
    # the backend allocated the engine's KV cache on the device: no step copies it over
    assert all(hasattr(t, "copy_to_host") for t in cu_llm.engine.kv_cache.k)
    expected = _greedy_tokens(ref_llm.engine, prompts, 3)
    assert _greedy_tokens(cu_llm.engine, prompts, 3) == expected
    # alone, with its prompt's full blocks now in the prefix cache: a prefill after a prefix
    assert _greedy_tokens(cu_llm.engine, prompts[:1], 2) == [expected[0][:2]]
    # n = 2 shares the prompt's partial last block, copied on the device before it is written
    from minillm import SamplingParams

    pair = SamplingParams(temperature=0, max_tokens=3, n=2)
    outs = [o.token_ids for o in cu_llm.generate(prompts[1:], pair)[0].outputs]
    assert outs == [expected[1], expected[1]]


def check_quantized_tiny_model_matches_ref() -> None:
    """The same model with its matrices in Q4_1 (layers), Q8_0 (embedding) and Q4_0 (lm_head),
    like the bundled GGUF: every linear is the quantized matvec, on both backends' own reading
    of the same bytes (on cuda through the engine's resident forward)."""
    from cuda_resident_checks import quantized_tiny

    from minillm.engine.llm_engine import EngineConfig, LLMEngine
    from minillm.model.llama import LlamaModel

    cu, ref = _backends()
    config, qweights, tokenizer = quantized_tiny()
    engine_config = EngineConfig(block_size=4, num_kv_blocks=24)
    tokens = {}
    for ops in (cu, ref):
        engine = LLMEngine(LlamaModel(config, qweights, ops), tokenizer, engine_config)
        tokens[ops.name] = _greedy_tokens(engine, ["paged attention"], 2)
    assert tokens["cuda"] == tokens["ref"]


CHECKS: dict[str, Callable[[], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in [
        check_fp16_scales_decode_exactly,
        check_linear_matvec_every_format,
        check_linear_tiled_matmul,
        check_linear_reads_wider_formats_as_fp32,
        check_embedding_every_format,
        check_rms_norm,
        check_rope_and_silu_mul,
        check_store_kv_cpu_and_device_caches,
        check_decode_attention_paged,
        check_prefill_attention_paged,
        check_bad_input_is_named,
        check_tiny_model_greedy_matches_ref,
        check_quantized_tiny_model_matches_ref,
        *RESIDENT_CHECKS,
    ]
}


def run_checks(names: list[str], out_path: Path) -> None:
    """Child side: run the named checks, record pass/fail, traceback and seconds as JSON."""
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name]()
            results[name] = {"ok": True, "error": ""}
        except Exception:  # report every failure, keep going
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        out_path.write_text(json.dumps(results, indent=1))  # partial results survive a crash


if __name__ == "__main__":
    run_checks(sys.argv[2:], Path(sys.argv[1]))
    sys.exit(0)


# ============================================================================ pytest side


def _gpu_present() -> bool:
    """A real GPU, asked in a fresh process so this one's numba stays untouched."""
    code = "from numba import cuda; print(int(cuda.is_available()))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return out.stdout.strip().endswith("1")


@pytest.fixture(scope="module")
def simulator_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cudasim")
    out = tmp / "results.json"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "MINILLM_CUDA_TEST_TMP": str(tmp)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, str(out), *CHECKS],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    results = json.loads(out.read_text()) if out.exists() else {}
    if len(results) < len(CHECKS):
        pytest.fail(
            f"the simulator child stopped early (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    print(
        f"\nsimulator checks: {time.perf_counter() - t0:.1f} s in all; "
        + ", ".join(f"{k} {v['seconds']} s" for k, v in results.items())
    )
    return results


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_under_simulator(name: str, simulator_results: dict) -> None:
    result = simulator_results[name]
    assert result["ok"], f"{name} failed in the simulator:\n{result['error']}"


def test_simulator_gives_a_block_one_shared_array_under_contention() -> None:
    """16 threads (one block) ask for the same shared array at the same moment, 500 times,
    with thread switches every microsecond. After minillm's patch every thread gets the same
    array; numba-cuda 0.30.4's unlocked lookup-then-insert gave a thread a private one in
    about 1 trial of 40, which broke the kernels' reductions (wrong greedy tokens)."""
    import threading

    from numba.cuda.simulator import kernelapi

    from minillm.kernels.cuda_simulator import make_shared_arrays_thread_safe

    make_shared_arrays_thread_safe()

    def arrays_handed_out() -> int:
        shared = kernelapi.FakeCUDAShared(0)
        start, got = threading.Barrier(16), []

        def thread() -> None:
            start.wait()
            got.append(shared.array(8, np.float32))  # one source line, as in a kernel

        workers = [threading.Thread(target=thread) for _ in range(16)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return len({id(a) for a in got})

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        counts = [arrays_handed_out() for _ in range(500)]
    finally:
        sys.setswitchinterval(before)
    assert max(counts) == 1, f"{sum(c > 1 for c in counts)} of 500 blocks got several arrays"


def test_cuda_backend_without_gpu_or_simulator_says_what_to_do() -> None:
    """In a plain process on a machine without a GPU, asking for 'cuda' explains the way out."""
    code = (
        "from minillm.kernels import get_backend, resolve_backend_name\n"
        "assert resolve_backend_name('auto') != 'cuda'\n"
        "try:\n    get_backend('cuda')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    if "NUMBA_ENABLE_CUDASIM" not in out.stdout and _gpu_present():
        pytest.skip("this machine has a GPU: backend 'cuda' is available for real")
    assert out.returncode == 0, out.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in out.stdout


def test_kernels_compile_for_a_real_gpu_in_fp32_only() -> None:
    """Compile every kernel to PTX (sm_80) with numba's real CUDA compiler, no GPU needed, and
    check that no float64 instruction slipped in (a Python float literal would cause one). The
    simulator runs kernels as Python and checks no types: this is where a kernel that would not
    compile for a GPU fails.

    Needs NVIDIA's NVVM and NVRTC libraries (the CUDA toolkit, or the nvidia-cuda-nvcc and
    nvidia-cuda-nvrtc wheels); skips with the loader's message when they are missing."""
    code = r"""
import sys
from numba import cuda, float32, int64, uint8, void
from numba import float64
from minillm.kernels import cuda_attention as A, cuda_linear as L, cuda_pointwise as P
from minillm.kernels import cuda_fused as F
f1, f2, f3, f4 = float32[::1], float32[:, ::1], float32[:, :, ::1], float32[:, :, :, ::1]
i1, i2 = int64[::1], int64[:, ::1]
kernels = {
    "tiled_matmul": (L.make_tiled_matmul(64, 16, 32), (f2, f2, f1, int64, f2)),
    "rms_norm": (P.make_rms_norm(128), (f2, f1, float32, f2)),
    "rope": (P.make_rope(), (f3, f2, f2, f3)),
    "silu_mul": (P.make_silu_mul(), (f1, f1, f1)),
    "store_kv": (P.make_store_kv(), (f3, f3, f4, f4, i1)),
    "decode": (A.make_paged_decode_attention(32, 64), (f3, f4, f4, i2, i1, float32, f3)),
    "prefill": (A.make_paged_prefill_attention(32, 64), (f3, f4, f4, i1, int64, float32, f3)),
}
kernels["rope_store"] = (F.make_rope_store(), (f2, f2, f2, i1, f4, f4, f3))
for fmt in ("F32", "Q8_0", "Q4_0", "Q4_1"):
    w = f2 if fmt == "F32" else uint8[:, ::1]
    kernels["matvec_" + fmt] = (L.make_matvec(fmt, 32, 4), (w, f2, f1, int64, f2))
    kernels["embedding_" + fmt] = (P.make_embedding(fmt), (i1, w, f2))
    # the resident path's fused kernels (cuda_fused.py), at SmolLM2's d = 576
    qkv_sig = (f2, f1, float32, w, w, w, f1, f1, f1, int64, f2)
    kernels["qkv_" + fmt] = (F.make_qkv(fmt, fmt, fmt, 32, 4, 576), qkv_sig)
    kernels["glu_" + fmt] = (F.make_glu(fmt, fmt, 32, 4, 576), (f2, f1, float32, w, w, f2))
    kernels["residual_" + fmt] = (L.make_matvec(fmt, 32, 4, True), (w, f2, f1, int64, f2))
    norm_sig = (f2, i1, f1, float32, w, f2)
    kernels["norm_matvec_" + fmt] = (F.make_norm_matvec(fmt, 32, 4, 576), norm_sig)
u8 = uint8[:, ::1]
kernels["qkv_mixed"] = (
    F.make_qkv("Q4_1", "Q8_0", "F32", 32, 4, 576),
    (f2, f1, float32, u8, u8, f2, f1, f1, f1, int64, f2),
)
try:
    cuda.compile_ptx(kernels["silu_mul"][0].py_func, void(f1, f1, f1), cc=(8, 0))
except Exception as e:
    print("SKIP", type(e).__name__, e)
    sys.exit(0)
for name, (kernel, sig) in kernels.items():
    ptx, _ = cuda.compile_ptx(kernel.py_func, void(*sig), cc=(8, 0))
    f64 = [line.strip() for line in ptx.splitlines() if ".f64" in line]
    assert not f64, (name, f64[:5])
    print("OK", name)
# the one kernel meant to use float64: rope angles, once per step (see make_rope_table)
ptx, _ = cuda.compile_ptx(F.make_rope_table().py_func, void(i1, float64[::1], f2, f2), cc=(8, 0))
assert ".f64" in ptx
print("OK rope_table")
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-6000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"numba cannot compile PTX here (no NVVM/NVRTC): {out.stdout.strip()}")
    assert out.stdout.count("OK ") == 34, out.stdout


# ---------------------------------------------------------------------------- real GPU only
@pytest.fixture(scope="module")
def real_gpu() -> None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not _gpu_present():
        pytest.skip(
            "needs an NVIDIA GPU that numba.cuda can use (numba.cuda.is_available() is "
            "false here); the same checks ran in the simulator"
        )


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_on_gpu(name: str, real_gpu: None) -> None:
    CHECKS[name]()


@pytest.mark.cuda
def test_gpu_quantized_matvec_streams_faster_than_cpu_matmul(real_gpu: None) -> None:
    """Decode speed is bandwidth: a Q4_1 matvec on the GPU reads 5 bits/weight from HBM and
    must beat torch's fp32 matmul on the CPU on the same 8192 x 8192 matrix."""
    from numba import cuda

    cu, ref = _backends()
    w = _quant((8192, 8192), "Q4_1", seed=0)
    w_cu, w_cpu = cu.prepare_linear(w), ref.prepare_linear(w)
    x = torch.randn(1, 8192)
    kernel = cu.make_matvec("Q4_1", cu.GPU_LAUNCH.lanes, cu.GPU_LAUNCH.rows_per_block)
    xd, out = cuda.to_device(x.numpy()), cuda.device_array((1, 8192), dtype=np.float32)
    bias = cuda.to_device(np.zeros(1, dtype=np.float32))
    grid = (8192 // cu.GPU_LAUNCH.rows_per_block, 1)
    block = (cu.GPU_LAUNCH.lanes, cu.GPU_LAUNCH.rows_per_block)
    kernel[grid, block](w_cu.data, xd, bias, 0, out)  # compile and warm up
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        kernel[grid, block](w_cu.data, xd, bias, 0, out)
    cuda.synchronize()
    gpu_s = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(3):
        ref.linear(x, w_cpu)
    cpu_s = (time.perf_counter() - t0) / 3
    print(
        f"\nQ4_1 matvec 8192x8192: GPU {gpu_s * 1e3:.3f} ms ({w.nbytes / gpu_s / 1e9:.0f} GB/s), "
        f"CPU fp32 matmul {cpu_s * 1e3:.1f} ms"
    )
    # 8192-term dot products summed in another order: allow for fp32 rounding growing with K
    _close(torch.from_numpy(out.copy_to_host()), ref.linear(x, w_cpu), "8192 Q4_1", atol=1e-3)
    assert gpu_s < cpu_s


def test_bench_cuda_without_gpu_says_so(capsys) -> None:  # noqa: ANN001
    """benchmarks/bench_cuda.py refuses clearly (exit 2) on a machine numba.cuda has no GPU on."""
    import importlib.util

    from minillm.kernels import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU: run benchmarks/bench_cuda.py for real")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cuda.py"
    spec = importlib.util.spec_from_file_location("bench_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--no-write"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
