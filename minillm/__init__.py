"""minillm: a small but real LLM inference engine, built to teach how LLMs are deployed.

The public names are imported lazily, so `import minillm.formats` (or the CLI's `--help`)
does not pay for torch and the model code. Importing it does one thing at once: it points
Numba at the one shared kernel cache (see ``minillm.numba_cache``) before Numba is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from minillm.numba_cache import use_shared_cache_dir

use_shared_cache_dir()

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "minillm.llm",
    "SamplingParams": "minillm.sampling",
    "RequestOutput": "minillm.engine.outputs",
    "CompletionOutput": "minillm.engine.outputs",
    "load_model": "minillm.loader",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
