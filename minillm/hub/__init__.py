"""Where models come from: the bundled SmolLM2, local paths, ModelScope and the HF hub.

``resolve(name)`` finds files (never downloads); ``pull`` fetches and registers; ``list_models``,
``show`` and ``remove`` manage the registry at $MINILLM_HOME (default ~/.minillm).
"""

from __future__ import annotations

from minillm.hub.catalog import ModelInfo, list_models, remove
from minillm.hub.errors import HubError, ModelNotFoundError
from minillm.hub.info import describe, show
from minillm.hub.puller import pull, register
from minillm.hub.ref import ModelRef
from minillm.hub.registry import minillm_home
from minillm.hub.resolver import resolve

__all__ = [
    "HubError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelRef",
    "describe",
    "list_models",
    "minillm_home",
    "pull",
    "register",
    "remove",
    "resolve",
    "show",
]
