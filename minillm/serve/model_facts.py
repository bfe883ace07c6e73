"""What the server says about its model (/api/tags, /api/show, /api/ps, /v1/models).

Facts come from the model's headers (minillm.hub.info), read once, on first use. No reply
reveals where the model lives on disk: an absolute path (a model served from a file, a
Modelfile's `FROM /abs/path`) is shown as its last component, the way a user would name it.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from minillm.hub.modelfile import Modelfile
from minillm.llm import LLM


def public_model_name(name: str) -> str:
    """`name`, or the last component of an absolute path ("/srv/m/x.gguf" -> "x.gguf")."""
    if os.path.isabs(os.path.expanduser(name)):
        return Path(name).name or name
    return name


class ModelFacts:
    """The served model's facts (lazy: the first /api/* call reads the headers)."""

    def __init__(self, llm: LLM, name: str, profile: Modelfile | None) -> None:
        self.llm, self.name, self.profile = llm, name, profile

    @cached_property
    def facts(self) -> dict[str, Any]:
        from minillm.hub.info import describe
        from minillm.hub.ref import ref_for_path

        return describe(ref_for_path(self.llm.loaded.path, name=self.name))

    @cached_property
    def digest(self) -> str:
        f = self.facts
        return hashlib.sha256(f"{f['path']}:{f['size']}".encode()).hexdigest()

    @property
    def size(self) -> int:
        return self.facts["size"]

    @property
    def parent_model(self) -> str:
        return public_model_name(self.profile.from_) if self.profile else ""

    def details(self) -> dict[str, Any]:
        f = self.facts
        return {
            "parent_model": self.parent_model,
            "format": f["format"],
            "family": f["architecture"],
            "families": [f["architecture"]],
            "parameter_size": f["parameter_size"],
            "quantization_level": str(f["quantization"]),
        }

    def model_info(self) -> dict[str, Any]:
        f, arch = self.facts, self.facts["architecture"]
        info = {"general.architecture": arch, "general.parameter_count": f["parameters"]}
        for key, name in (
            ("context_length", "context_length"),
            ("embedding_length", "embedding_length"),
            ("block_count", "layers"),
            ("attention.head_count", "heads"),
            ("attention.head_count_kv", "kv_heads"),
            ("vocab_size", "vocab_size"),
        ):
            if f.get(name) is not None:
                info[f"{arch}.{key}"] = f[name]
        return info

    def modified_at(self) -> str:
        path = self.llm.loaded.path
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()

    def modelfile(self) -> str:
        """The Modelfile text /api/show returns, FROM naming the model, not its path."""
        if self.profile is None:
            return f"FROM {self.name}\n"
        text = self.profile.to_text()
        first, _, rest = text.partition("\n")
        return f"FROM {self.parent_model}\n{rest}" if first.startswith("FROM ") else text

    def license(self) -> str | None:
        if self.profile and self.profile.license:
            return "\n\n".join(self.profile.license)
        return self.facts.get("license")
