"""Compile the cpu backend's Numba kernels once, into the shared on-disk cache.

    python -m minillm.kernels.warmup [MODEL]

`make setup` runs this so that the first lesson, test, `minillm run` or `minillm serve` loads
machine code in seconds instead of compiling for about half a minute. Numba compiles one
machine-code version per *type signature* of a kernel's arguments, so the warm-up must reach
every signature those entry points use on the bundled model; each call below names the path it
stands for. The cache is the one `minillm.numba_cache` chooses (`.cache/numba` in a checkout),
so a plain shell finds what make compiled. A kernel that still compiles later shows up with
NUMBA_DEBUG_CACHE=1 as a "[cache] data saved" line; tests/test_numba_cache.py checks that
`minillm run` and the server's paths print none after this warm-up.
"""

from __future__ import annotations

import sys
import time


def warm_up(model: str = "smollm2") -> float:
    """Run every kernel path once on `model`; returns the seconds it took (compiling included)."""
    from minillm import LLM, SamplingParams
    from minillm.kernels import roofline

    t0 = time.perf_counter()
    # The settings `minillm run`, LLM() and `minillm serve` use (prefix caching on).
    llm = LLM(model, backend="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    question = "Paged attention keeps the KV cache in fixed-size blocks. Why? " * 3
    chat = [{"role": "user", "content": question}]
    llm.chat(chat, params)  # `minillm run`: many-token prefill, then single-sequence decode
    llm.chat(chat, params)  # the same prompt again: a prefix-cache hit prefills only its tail
    llm.generate(["Hello", "Hi there"], params)  # batched decode (two sequences)
    # Continuous batching in the server: a prompt arrives while another request decodes, so one
    # step holds a prefill chunk and a decode token (those steps run op by op, not fused).
    engine = llm.engine
    engine.add_request("warmup-decoding", "Once upon a time", params)
    engine.step()
    engine.add_request("warmup-arriving", question, params)
    while engine.has_unfinished_requests():
        engine.step()
    # The exact path, fp32 activations (LLM(activations="fp32"), lessons 04 and 09, the tests):
    # its q8 lm_head keeps rows instead of panels, a signature of its own
    exact = LLM(model, backend="cpu", activations="fp32")
    exact.chat(chat, params)
    exact.generate(["Hello", "Hi there"], params)
    roofline.measure_bandwidth(1, megabytes=1, reps=1)  # lesson 04's roofs
    roofline.measure_fma_peak(1, steps=10, reps=1)
    roofline.measure_int8_peak(1, steps=10, reps=1)
    # Gemma 3's one kernel of its own (GeGLU); its windowed attention is the same kernel, and
    # running the model here would assemble its 253 MB file during setup
    import torch

    from minillm.kernels import cpu

    cpu.gelu_tanh_mul(torch.zeros(2, 32), torch.zeros(2, 32))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from minillm.numba_cache import use_shared_cache_dir

    args = sys.argv[1:] if argv is None else argv
    seconds = warm_up(*args[:1])
    print(
        f"cpu kernels ready ({seconds:.0f} s), cached in {use_shared_cache_dir()}; "
        "later runs load them from there"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
