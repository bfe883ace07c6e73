"""The two ways finding a model can fail, kept apart so the CLI can print each as one line."""

from __future__ import annotations


class ModelNotFoundError(LookupError):
    """The name does not lead to a model on this machine (resolve never downloads)."""


class HubError(RuntimeError):
    """Getting a model failed: the network, pip, a source library or the local registry."""
