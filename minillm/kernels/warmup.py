"""Compile the cpu backend's Numba kernels once, into Numba's on-disk cache.

    python -m minillm.kernels.warmup [MODEL]

`make setup` runs this so that the first lesson, test or `minillm run` loads machine code in
seconds instead of compiling for about a minute. One short generation reaches every kernel
signature the engine uses: a long prompt (the many-token kernels of prefill), single-sequence
decode (the matvecs, inside cpu_layer's one call per layer) and a small batch (batched decode).
"""

from __future__ import annotations

import sys
import time


def warm_up(model: str = "smollm2") -> float:
    """Run the kernels once on `model`; returns the seconds it took (compilation included)."""
    from minillm import LLM, SamplingParams
    from minillm.kernels import roofline

    t0 = time.perf_counter()
    llm = LLM(model, backend="cpu", enable_prefix_caching=False)
    long_prompt = "Paged attention keeps the KV cache in fixed-size blocks. " * 4
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([long_prompt], params)  # prefill + single-sequence decode
    llm.generate(["Hello", "Hi there"], params)  # a batch of two
    roofline.measure_bandwidth(1, megabytes=1, reps=1)  # lesson 04's two roofs
    roofline.measure_fma_peak(1, steps=10, reps=1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    seconds = warm_up(*args[:1])
    print(f"cpu kernels ready ({seconds:.0f} s; later runs load them from the cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
