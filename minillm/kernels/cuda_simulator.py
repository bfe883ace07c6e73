"""Numba's CUDA simulator, made safe for kernels that cooperate through shared memory.

The simulator runs each thread of a block as a Python thread. There ``cuda.shared.array`` means
"the block's array for this source line: look it up, or create it", a dict lookup and then an
insert, with nothing in between to stop another thread. Two threads can both miss and each
create an array. The one whose array is overwritten in the dict then writes its part of a
reduction where no other thread reads, and its slot in the surviving array holds whatever
``np.empty`` left there. We saw this as wrong greedy tokens (and a float overflow inside the
RMSNorm kernel) in about one run in ten when two simulated engines ran at once
(numba-cuda 0.30.4). Doing the lookup-or-create under a lock removes the race; a real GPU
never had it.
"""

from __future__ import annotations

import sys
import threading
import traceback

import numpy as np

_lock = threading.Lock()


def make_shared_arrays_thread_safe() -> None:
    """Patch the simulator's shared-array allocation (once; a no-op without the simulator)."""
    try:
        from numba.cuda.simulator import kernelapi
    except ImportError:
        return
    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "thread_safe", False):
        return
    original = shared.array

    def array(self, shape, dtype, alignment=None):  # noqa: ANN001, ANN202 - numba's signature
        if alignment is not None or shape == 0:  # an error / dynamic shared memory: numba's way
            return original(self, shape, dtype, alignment)
        if not isinstance(dtype, np.dtype | type):
            from numba.cuda.np import numpy_support

            dtype = numpy_support.as_dtype(dtype)
        # the same key numba uses: the (file, line) of the cuda.shared.array call
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2])
        with _lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array.thread_safe = True
    shared.array = array
