"""Launch shapes of the cuda backend's kernels, and the simulator's thread switching.

A ``LaunchConfig`` holds every kernel's block and grid sizes: the GPU's (a warp per matvec
row, 64-column x 16-token matmul tiles, a block per work item) or a small one for numba's
simulator, where each thread costs a Python thread and each barrier a round of thread
switches. The kernels are correct under either (grid-stride loops); tests run both, and
``use_launch_config`` switches them for a block of code. Both the op-by-op backend
(``cuda.py``) and the resident forward (``cuda_resident.py``) launch with the shapes in force.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass


def _simulator_enabled() -> bool:
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba keeps the flag in numba.config
        from numba import config
    return bool(config.ENABLE_CUDASIM)


SIMULATED = _simulator_enabled()


# ----------------------------------------------------------------------------- launch shapes
@dataclass(frozen=True)
class LaunchConfig:
    tile_cols: int  # tiled matmul: threads per block = weight rows per output tile
    tile_rows: int  # tiled matmul: tokens per output tile (accumulators per thread)
    tile_depth: int  # tiled matmul: K step per pair of barriers
    lanes: int  # matvec: threads that share one output row (a warp on a GPU)
    rows_per_block: int  # matvec: rows (warps) per block
    norm_threads: int  # RMSNorm: threads per row
    attn_threads: int  # attention: keys (decode) or queries (prefill) per block
    elementwise_threads: int  # embedding, RoPE, SiLU-mul, store_kv
    max_blocks: int  # grid cap; grid-stride loops cover the rest


GPU_LAUNCH = LaunchConfig(
    tile_cols=64,
    tile_rows=16,
    tile_depth=32,
    lanes=32,
    rows_per_block=4,
    norm_threads=128,
    attn_threads=32,
    elementwise_threads=256,
    max_blocks=65535,
)
# The simulator pays per thread (a Python thread each) and per barrier (a round of thread
# switches), so it gets few threads and few blocks; the kernels loop over the rest.
SIM_LAUNCH = LaunchConfig(
    tile_cols=16,
    tile_rows=16,
    tile_depth=64,
    lanes=1,
    rows_per_block=4,
    norm_threads=4,
    attn_threads=8,
    elementwise_threads=32,
    max_blocks=1,
)

_launch = SIM_LAUNCH if SIMULATED else GPU_LAUNCH


def launch_config() -> LaunchConfig:
    return _launch


@contextlib.contextmanager
def use_launch_config(config: LaunchConfig) -> Iterator[LaunchConfig]:
    """Run the ops with other launch shapes, e.g. the GPU's under the simulator in tests."""
    global _launch
    previous, _launch = _launch, config
    try:
        yield config
    finally:
        _launch = previous


@contextlib.contextmanager
def simulator_switching() -> Iterator[None]:
    """In the simulator a barrier is a hand-off between Python threads; the default 5 ms GIL
    switch interval makes each one slow, so launches run with a short one (restored after)."""
    if not SIMULATED:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(float(os.environ.get("MINILLM_CUDASIM_SWITCH", "1e-4")))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
