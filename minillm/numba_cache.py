"""One on-disk Numba cache for every entry point: the CLI, Python, Jupyter and the tests.

The cpu kernels take about half a minute to compile, and Numba keeps the machine code on disk,
but *where* depends on NUMBA_CACHE_DIR. `make setup` warmed `.cache/numba` (make exports the
variable), while a plain shell (`source .venv/bin/activate; minillm run smollm2 "hi"`) fell back
to Numba's default, `__pycache__` beside the sources, and compiled everything again (measured:
first run 33.7 s instead of ~3 s). So minillm picks the directory itself when the user has not:
importing the package calls `use_shared_cache_dir()`, which sets NUMBA_CACHE_DIR before
anything imports Numba (child processes inherit it), and updates Numba's config as well when
Numba was imported first (an `import numba` cell above `import minillm` in a notebook).

- In a source checkout (the package sits beside its pyproject.toml): the repository's
  `.cache/numba`, the directory `make setup` warms and the Makefile's stale-cache rule clears.
- Otherwise (an installed wheel, or a read-only checkout): a per-user directory,
  `$XDG_CACHE_HOME/minillm/numba` (default `~/.cache/minillm/numba`), because site-packages
  may not be writable and must not collect build products.

A non-empty NUMBA_CACHE_DIR set by the user always wins. Importing this module costs nothing:
it imports neither Numba nor torch.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "NUMBA_CACHE_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_CACHE = Path(".cache") / "numba"  # relative to the repository root; the Makefile's too


def _is_source_checkout(root: Path) -> bool:
    """True when `root` is this project's repository (an editable install or a plain clone)."""
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return 'name = "minillm"' in text


def _writable(path: Path) -> bool:
    """Whether `path`, or the nearest part of it that exists, can take new files."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return os.access(candidate, os.W_OK | os.X_OK)
    return False


def _user_cache_home(environ: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME (only if absolute, as the XDG spec says), else ~/.cache."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg)
    try:
        return Path.home() / ".cache"
    except RuntimeError:  # no home directory (a bare container user): still one fixed place
        return Path(tempfile.gettempdir()) / f"minillm-{os.getuid()}"


def default_cache_dir(
    package_dir: Path = PACKAGE_DIR, environ: Mapping[str, str] = os.environ
) -> Path:
    """Where minillm keeps Numba's cache when NUMBA_CACHE_DIR is not set (see the module doc)."""
    root = package_dir.parent
    if _is_source_checkout(root) and _writable(root / CHECKOUT_CACHE):
        return root / CHECKOUT_CACHE
    return _user_cache_home(environ) / "minillm" / "numba"


def use_shared_cache_dir() -> str:
    """Point Numba at the shared cache unless the user chose one; returns the directory used."""
    chosen = os.environ.get(ENV_VAR, "").strip()
    if not chosen:
        chosen = str(default_cache_dir())
        os.environ[ENV_VAR] = chosen
    config = sys.modules.get("numba.core.config")
    if config is not None and getattr(config, "CACHE_DIR", None) != chosen:
        # Numba read its environment at import; kernels defined from now on use this one.
        config.CACHE_DIR = chosen
    return chosen
