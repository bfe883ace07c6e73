"""How the processes of one parallel run share the machine's cores.

The ranks of a run wait on each other in every collective. torch's and Numba's thread pools
are OpenMP pools whose idle threads spin before they sleep; when a run has more threads than
the machine has free cores (always, for N ranks on a laptop or a shared 2-core box), a rank's
spinning pool takes the core that the rank being waited on needs. Measured on 2 busy cores,
SmolLM2 on the cpu backend, tp=3, 16 tokens:

    every process with all the cores, default wait policy    0.7 tok/s
    workers passive, rank 0 with all the cores               0.8 tok/s
    every process passive                                    4.0 tok/s
    workers passive, each rank with cores // N threads       3.7 tok/s

So each rank takes its share of the cores (rank 0 too, for as long as the workers live; its
own settings come back when they stop), and workers start with OMP_WAIT_POLICY=passive unless
the user chose a policy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

WAIT_POLICY = "OMP_WAIT_POLICY"


def share_cores(world_size: int, backend: str) -> Callable[[], None]:
    """Give this process cores // world_size threads (torch, and Numba on the cpu backend);
    returns a function that puts the previous counts back."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // world_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore_numba: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "cpu":
        import numba

        numba_before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        restore_numba = lambda: numba.set_num_threads(numba_before)  # noqa: E731

    def restore() -> None:
        torch.set_num_threads(before)
        restore_numba()

    return restore


@contextmanager
def worker_environment() -> Iterator[None]:
    """Processes spawned inside this block inherit OMP_WAIT_POLICY=passive (if it is unset)."""
    chosen = os.environ.get(WAIT_POLICY)
    if chosen is None:
        os.environ[WAIT_POLICY] = "passive"
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop(WAIT_POLICY, None)
