"""The cpu kernels release the GIL, so a server's event loop runs while a step computes.

minillm's server drives the engine from one thread and streams from another (asyncio); a
kernel that held the GIL for the ~20 ms of a 16-sequence step stalled every stream for that
long. A kernel added without ``nogil=True`` is the regression this catches.
"""

from __future__ import annotations

import importlib

import pytest
from numba.core.registry import CPUDispatcher

MODULES = ("cpu_a8", "cpu_attention", "cpu_layer", "cpu_linear", "cpu_pointwise", "cpu_q4")


def _python_callable_kernels() -> list[tuple[str, CPUDispatcher]]:
    """Every compiled kernel of the cpu backend that Python can call (inlined helpers cannot)."""
    found = []
    for name in MODULES:
        module = importlib.import_module(f"minillm.kernels.{name}")
        for attr, value in vars(module).items():
            if (
                isinstance(value, CPUDispatcher)
                and value.__module__ == module.__name__
                and value.targetoptions.get("inline", "never") == "never"
            ):
                found.append((f"{name}.{attr}", value))
    return found


def test_the_scan_finds_the_kernels() -> None:
    names = {n for n, _ in _python_callable_kernels()}
    assert {
        "cpu_layer.decode_layer",
        "cpu_linear.packed_matmul",
        "cpu_attention.paged_decode",
    } <= names


@pytest.mark.parametrize("name,kernel", _python_callable_kernels(), ids=lambda v: str(v))
def test_kernel_releases_the_gil(name: str, kernel: CPUDispatcher) -> None:
    assert kernel.targetoptions.get("nogil") is True, f"{name} holds the GIL: add nogil=True"
