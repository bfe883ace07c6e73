"""`list_models` and `remove`: what the registry holds, and forgetting a model."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from minillm.hub import bundled, bundled_gemma3
from minillm.hub.errors import HubError, ModelNotFoundError
from minillm.hub.names import parse_remote
from minillm.hub.ref import ModelRef
from minillm.hub.registry import (
    all_manifests,
    delete_manifest,
    download_dir,
    minillm_home,
    models_dir,
    read_manifest,
)

DOWNLOADED_SOURCES = ("modelscope", "hf")


@dataclass(frozen=True)
class ModelInfo:
    """One row of `minillm list`."""

    name: str
    source: str
    format: str
    path: Path
    size: int
    modified: datetime  # when pulled; for a never-pulled bundled model, the file's mtime


def list_models() -> list[ModelInfo]:
    """Registered models, plus the bundled one whenever its package is installed; newest first."""
    rows = {
        m.name: ModelInfo(m.name, m.source, m.format, Path(m.path), m.size, m.pulled_datetime)
        for m in all_manifests()
    }
    gguf = bundled.bundled_gguf()
    if gguf is not None:
        stat = gguf.stat()
        pulled = rows.get(bundled.NAME)
        modified = pulled.modified if pulled else datetime.fromtimestamp(stat.st_mtime, UTC)
        rows[bundled.NAME] = ModelInfo(
            bundled.NAME, "bundled", "gguf", gguf, stat.st_size, modified
        )
    chunks = bundled_gemma3.chunk_files()
    if chunks is not None:  # listed before it is assembled: its path is where it will be
        pulled = rows.get(bundled_gemma3.NAME)
        installed_at = datetime.fromtimestamp(chunks[0].stat().st_mtime, UTC)
        rows[bundled_gemma3.NAME] = ModelInfo(
            bundled_gemma3.NAME, "bundled", "gguf", bundled_gemma3.store_path(),
            bundled_gemma3.expected_size(), pulled.modified if pulled else installed_at,
        )  # fmt: skip
    return sorted(rows.values(), key=lambda r: r.modified, reverse=True)


def _registry_key(name: str) -> str:
    name = name.strip()
    if bundled.is_bundled_name(name):
        return bundled.NAME
    if bundled_gemma3.is_gemma3_name(name):
        return bundled_gemma3.NAME
    remote = parse_remote(name)
    if remote:
        return remote.canonical
    if read_manifest(name) is None and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def remove(name: str) -> ModelRef:
    """Forget a model. Downloaded files are deleted; a bundled or local-path model is only
    unregistered: the user's files and site-packages are never touched."""
    key = _registry_key(name)
    manifest = read_manifest(key)
    if key == bundled.NAME:
        gguf = bundled.bundled_gguf()
        if manifest is None and gguf is None:
            raise ModelNotFoundError(f"model {name!r} is not installed or registered")
        delete_manifest(key)
        return ModelRef(bundled.NAME, "bundled", gguf or Path(manifest.path), "gguf")  # type: ignore[union-attr]
    if key == bundled_gemma3.NAME:  # the assembled copy goes; the packages stay installed
        path = bundled_gemma3.store_path()
        if manifest is None and not path.exists() and not bundled_gemma3.installed():
            raise ModelNotFoundError(f"model {name!r} is not installed or registered")
        delete_manifest(key)
        path.unlink(missing_ok=True)
        return ModelRef(bundled_gemma3.NAME, "bundled", path, "gguf")
    if manifest is None:
        raise ModelNotFoundError(
            f"model {name!r} is not in the registry ({minillm_home()}); `minillm list` shows what is"
        )
    if manifest.source in DOWNLOADED_SOURCES:
        folder = download_dir(key)
        if folder.resolve().parent != models_dir().resolve():
            raise HubError(f"refusing to delete {folder}: it is not inside {models_dir()}")
        trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
        if folder.exists():
            folder.rename(trash)  # atomic: the model disappears at once, then the bytes go
        delete_manifest(key)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        delete_manifest(key)
        if manifest.source == "modelfile":  # a `minillm create` model: forget its Modelfile too
            from minillm.hub.created import delete_profile

            delete_profile(key)
    return ModelRef(manifest.name, manifest.source, Path(manifest.path), manifest.format)  # type: ignore[arg-type]
