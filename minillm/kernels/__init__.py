"""Backends: small namespaces of ops (see ref.py for the contract) chosen by name.

- ``ref``: torch fp32, the readable specification.
- ``cpu``: Numba ``njit`` kernels that compute on the quantized blocks directly.
- ``cuda``: ``numba.cuda`` kernels (a real GPU, or the simulator with NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import importlib
import os
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

BACKENDS = ("ref", "cpu", "cuda")
ACTIVATIONS = ("int8", "fp32")  # what a cpu matmul does with x (kernels/cpu.py)


def cuda_available() -> bool:
    """A real NVIDIA GPU that numba.cuda can use (the simulator does not count for 'auto')."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or no driver
        return False


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"minillm.kernels.{name}")
        return True
    except ImportError:
        return False


def resolve_backend_name(name: str = "auto") -> str:
    """'auto' -> $MINILLM_BACKEND if set, else cuda when a GPU is there, else cpu (Numba),
    else ref (torch) where Numba is missing."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
            )
        return name
    forced = os.environ.get("MINILLM_BACKEND")
    if forced:
        if forced != "auto":
            return resolve_backend_name(forced)
    if cuda_available() and _importable("cuda"):
        return "cuda"
    return "cpu" if _importable("cpu") else "ref"


def get_backend(name: str = "auto") -> ModuleType:
    """The backend module for `name`; 'auto' picks the fastest one this machine can run."""
    resolved = resolve_backend_name(name)
    try:
        return importlib.import_module(f"minillm.kernels.{resolved}")
    except ImportError as e:
        raise ValueError(f"backend {resolved!r} is not available here: {e}") from e


def check_activations(mode: object) -> str:
    """`mode` if it names an activation mode, else a ValueError that lists them."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {mode!r}")
    return mode


def activations_mode(ops: ModuleType, activations: str | None) -> AbstractContextManager:
    """A context in which `ops` prepares weights for `activations` ("int8" | "fp32"; None:
    the backend's default). Only the cpu backend has int8 activations."""
    if activations is None:
        return nullcontext()
    check_activations(activations)
    if hasattr(ops, "activations"):
        return ops.activations(activations)
    if activations != "fp32":
        raise ValueError(
            f"activations={activations!r}: the {ops.name} backend computes in fp32 only "
            "(int8 activations are the cpu backend's); use 'fp32' or leave it unset"
        )
    return nullcontext()
