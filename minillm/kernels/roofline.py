"""This machine's roofs, measured with Numba: memory read bandwidth, fp32 FMA and int8 peaks.

The roofline model bounds a kernel's speed by whichever runs out first: bytes it reads /
bandwidth, or FLOPs it does / peak FLOP rate. Decode reads every weight for one multiply-add
(~3 FLOP per byte of Q4_1) and sits under the bandwidth roof; a batch of T tokens does T times
the FLOPs per byte and meets the compute roof. Lesson 04 and ``benchmarks/bench_kernels.py``
measure the roofs here rather than quoting a datasheet. The int8 roof is the one the int8
activation kernels (``cpu_a8``) run under: ``vpdpbusd`` does 64 byte multiply-adds where an
fp32 FMA does 16.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange

from minillm.kernels.cpu_numerics import FASTMATH, lanes
from minillm.kernels.cpu_vnni import CHAINS, dpbusd_chain


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def array_sum(a):  # noqa: ANN001, ANN201
    """Sum of a float32 array, its chunks split across the threads: one add per 4 bytes read."""
    s = np.float32(0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def fma_chains(steps, out):  # noqa: ANN001, ANN201
    """Item c of out: 6 x 32 float32 accumulators each updated a = a * m + e `steps` times,
    summed. 12 AVX-512 registers of independent chains hide the FMA latency; nothing is
    read from memory inside the loop. The result is used, so LLVM cannot drop the loop."""
    for c in prange(out.shape[0]):
        a0, a1, a2 = lanes(32), lanes(32), lanes(32)
        a3, a4, a5 = lanes(32), lanes(32), lanes(32)
        m, e = np.float32(0.999999), np.float32(1e-7) * np.float32(c + 1)
        for _ in range(steps):
            for lane in range(32):
                a0[lane] = a0[lane] * m + e
                a1[lane] = a1[lane] * m + e
                a2[lane] = a2[lane] * m + e
                a3[lane] = a3[lane] * m + e
                a4[lane] = a4[lane] * m + e
                a5[lane] = a5[lane] * m + e
        total = np.float32(0)
        for lane in range(32):
            total += a0[lane] + a1[lane] + a2[lane] + a3[lane] + a4[lane] + a5[lane]
        out[c] = total


@njit(parallel=True, cache=True)
def int8_chains(steps, out):  # noqa: ANN001, ANN201
    """Item c of out: the lane sum of CHAINS register accumulators after `steps` rounds of
    vpdpbusd each (cpu_vnni.dpbusd_chain)."""
    for c in prange(out.shape[0]):
        out[c] = dpbusd_chain(steps)


def best_seconds(fn, reps: int) -> float:  # noqa: ANN001
    """The fastest of `reps` runs: the one least disturbed by other programs on the cores."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(threads: int, megabytes: int = 256, reps: int = 5) -> float:
    """Read bandwidth in GB/s: `threads` Numba threads summing a float32 array far larger
    than the caches."""
    numba.set_num_threads(threads)
    a = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    array_sum(a)  # compile (or load), and touch every page once
    return a.nbytes / best_seconds(lambda: array_sum(a), reps) / 1e9


def measure_fma_peak(threads: int, steps: int = 1_000_000, reps: int = 3) -> float:
    """Peak fp32 throughput in GFLOP/s (a multiply-add counts 2) on `threads` threads."""
    numba.set_num_threads(threads)
    out = np.zeros(threads, np.float32)
    fma_chains(10, out)
    return 2 * 6 * 32 * steps * threads / best_seconds(lambda: fma_chains(steps, out), reps) / 1e9


def measure_int8_peak(threads: int, steps: int = 1_000_000, reps: int = 3) -> float:
    """Peak int8 throughput in GOP/s (a byte multiply-add counts 2, as in the fp32 roof) on
    `threads` threads: what the int8 activation kernels could reach at best."""
    numba.set_num_threads(threads)
    out = np.zeros(threads, np.int64)
    int8_chains(10, out)
    seconds = best_seconds(lambda: int8_chains(steps, out), reps)
    if out[0] != 4 * 16 * CHAINS * steps:  # each round adds 4 (1 x 1, four times) per lane
        raise RuntimeError(f"int8 peak kernel computed {out[0]}, not {4 * 16 * CHAINS * steps}")
    return 2 * 64 * CHAINS * steps * threads / seconds / 1e9
