"""Model names: the bundled aliases and the `source:ORG/NAME[/FILE.gguf]` form of remote models."""

from __future__ import annotations

import re
from dataclasses import dataclass

REMOTE_SOURCES = ("modelscope", "hf")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REMOTE = re.compile(rf"^(?P<source>[a-z]+):(?P<org>{_PART})/(?P<repo>{_PART})(?:/(?P<file>.+))?$")

ACCEPTED_FORMS = (
    "smollm2 or smollm2:135m (the bundled SmolLM2-135M-Instruct, Q4_1 GGUF)",
    "gemma3-270m or gemma3 (the bundled Gemma 3 270M base model, Q4_K_M GGUF; Gemma terms)",
    "a path to a .gguf file",
    "a path to a Hugging Face folder (config.json + *.safetensors + tokenizer.json)",
    "modelscope:ORG/NAME or hf:ORG/NAME, once `minillm pull` has downloaded it",
    "modelscope:ORG/NAME/FILE.gguf or hf:ORG/NAME/FILE.gguf to pick one GGUF file of a repo",
)


@dataclass(frozen=True)
class RemoteName:
    """A model on ModelScope or the HF hub; ``filename`` picks one GGUF file of the repo."""

    source: str
    repo_id: str
    filename: str | None = None

    @property
    def canonical(self) -> str:
        base = f"{self.source}:{self.repo_id}"
        return f"{base}/{self.filename}" if self.filename else base


def parse_remote(name: str) -> RemoteName | None:
    """`hf:ORG/NAME` -> RemoteName; None for names without a source prefix.

    A known prefix with a malformed rest is a ValueError, so a typo is not mistaken for a path.
    """
    prefix, sep, _ = name.partition(":")
    if not sep or prefix not in REMOTE_SOURCES:
        return None
    m = _REMOTE.match(name)
    if not m:
        raise ValueError(
            f"malformed model name {name!r}: expected {prefix}:ORG/NAME or {prefix}:ORG/NAME/FILE.gguf"
        )
    filename = m["file"]
    if filename is not None:
        parts = filename.split("/")
        if not filename.lower().endswith(".gguf") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(
                f"malformed model name {name!r}: the part after ORG/NAME must be a .gguf file "
                f"in the repo, e.g. {prefix}:{m['org']}/{m['repo']}/model-q4_0.gguf"
            )
    return RemoteName(m["source"], f"{m['org']}/{m['repo']}", filename)


def accepted_forms_text() -> str:
    return "\n".join(f"  - {form}" for form in ACCEPTED_FORMS)
