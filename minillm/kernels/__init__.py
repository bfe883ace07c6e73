"""Backends: small namespaces of ops (see ref.py for the contract) chosen by name."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("ref",)


def get_backend(name: str = "auto") -> ModuleType:
    """The backend module for `name`; 'auto' picks the fastest one this machine can run."""
    if name == "auto":
        name = BACKENDS[-1]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} or 'auto'")
    return importlib.import_module(f"minillm.kernels.{name}")
