"""The local registry at $MINILLM_HOME (default ~/.minillm): one JSON manifest per model.

Layout::

    $MINILLM_HOME/manifests/<slug>.json   name, source, path, format, size, pulled_at
    $MINILLM_HOME/models/<slug>/          files downloaded from ModelScope or the HF hub

A manifest is written only after its files are complete, and replaced atomically, so a reader
never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from minillm.hub.errors import HubError

MANIFEST_VERSION = 1


def minillm_home() -> Path:
    return Path(os.environ.get("MINILLM_HOME") or "~/.minillm").expanduser()


def manifests_dir() -> Path:
    return minillm_home() / "manifests"


def models_dir() -> Path:
    return minillm_home() / "models"


def slug(name: str) -> str:
    """A file-system-safe, unique key: readable prefix + hash of the exact name."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[-80:] or "model"
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def download_dir(name: str) -> Path:
    """Where a downloaded model's files live."""
    return models_dir() / slug(name)


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str
    path: str
    format: str
    size: int
    pulled_at: str  # ISO 8601, UTC

    @property
    def pulled_datetime(self) -> datetime:
        return datetime.fromisoformat(self.pulled_at)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _manifest_file(name: str) -> Path:
    return manifests_dir() / f"{slug(name)}.json"


def write_manifest(manifest: Manifest) -> Path:
    """Write (or replace) a manifest atomically: a temp file renamed over the old one."""
    target = _manifest_file(manifest.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {"manifest_version": MANIFEST_VERSION, **asdict(manifest)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _parse(file: Path) -> Manifest:
    data = json.loads(file.read_text(encoding="utf-8"))
    return Manifest(**{k: data[k] for k in Manifest.__dataclass_fields__})


def read_manifest(name: str) -> Manifest | None:
    """The manifest registered under exactly ``name``, or None."""
    file = _manifest_file(name)
    if not file.is_file():
        return None
    try:
        manifest = _parse(file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HubError(
            f"the registry manifest {file} is corrupt ({e}); delete it or pull again"
        ) from e
    return manifest if manifest.name == name else None


def all_manifests() -> list[Manifest]:
    """Every readable manifest; a corrupt one is skipped with a warning, not fatal for `list`."""
    found = []
    for file in sorted(manifests_dir().glob("*.json")):
        try:
            found.append(_parse(file))
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"skipping corrupt registry manifest {file}: {e}", stacklevel=2)
    return found


def delete_manifest(name: str) -> bool:
    file = _manifest_file(name)
    if file.is_file():
        file.unlink()
        return True
    return False


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
