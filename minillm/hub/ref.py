"""ModelRef: what `resolve` hands the engine, and how a local path becomes one.

A model on disk is either one GGUF file or a Hugging Face folder (config.json + *.safetensors +
tokenizer.json). Telling them apart here means the loader never has to guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Source = Literal["bundled", "path", "modelscope", "hf", "registry", "modelfile"]
Format = Literal["gguf", "hf"]

HF_REQUIRED_FILES = ("config.json", "tokenizer.json")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are. ``path`` is the .gguf file or the HF folder."""

    name: str
    source: Source
    path: Path
    format: Format


def is_gguf_file(path: Path) -> bool:
    """True when the file starts with GGUF's magic bytes (cheaper and surer than the suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def ref_for_path(path: Path, name: str | None = None, source: Source = "path") -> ModelRef:
    """Classify a local file or folder; ValueError says what is missing when it is neither."""
    path = path.expanduser().resolve()
    label = name or str(path)
    if path.is_file():
        if not is_gguf_file(path):
            raise ValueError(
                f"{path} is not a GGUF file (it does not start with b'GGUF'); minillm loads a "
                ".gguf file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json)"
            )
        return ModelRef(label, source, path, "gguf")
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    has_weights = any(path.glob("*.safetensors"))
    missing = [f for f in HF_REQUIRED_FILES if not (path / f).is_file()]
    if has_weights and not missing:
        return ModelRef(label, source, path, "hf")
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1 and not has_weights:
        return ref_for_path(ggufs[0], name=label, source=source)
    if len(ggufs) > 1:
        raise ValueError(
            f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); "
            "pass the path of the one you want"
        )
    if not has_weights:
        missing.append("*.safetensors")
    raise ValueError(
        f"{path} is not a Hugging Face model folder: it lacks {', '.join(missing)} "
        "(minillm needs config.json, *.safetensors and tokenizer.json, or one .gguf file)"
    )
