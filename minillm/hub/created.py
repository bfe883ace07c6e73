"""Models made by `minillm create NAME -f Modelfile`: a registry entry plus its Modelfile.

The manifest (source "modelfile") points at the base model's weights, so `resolve(NAME)` and
`LLM(NAME)` load them like any other model; the Modelfile itself (system prompt, parameters,
template, example messages) is kept beside it in $MINILLM_HOME/modelfiles/ and applied by
`run` and `serve`. No weights are copied.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from minillm.formats.gguf import GGUFError
from minillm.formats.gguf_check import check_gguf_model
from minillm.hub import bundled, bundled_gemma3
from minillm.hub.errors import HubError, ModelNotFoundError
from minillm.hub.modelfile import Modelfile, parse_modelfile
from minillm.hub.names import REMOTE_SOURCES
from minillm.hub.registry import (
    Manifest,
    minillm_home,
    now_iso,
    read_manifest,
    slug,
    tree_size,
    write_manifest,
)
from minillm.hub.resolver import resolve

SOURCE = "modelfile"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def modelfiles_dir() -> Path:
    return minillm_home() / "modelfiles"


def _modelfile_path(name: str) -> Path:
    return modelfiles_dir() / f"{slug(name)}.json"


def check_new_name(name: str) -> str:
    """A name `create` may use: no path, no remote prefix, no bundled model's alias (a created
    model of that name would hide the bundled one from `run`, `serve` and `LLM`)."""
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits and . _ : - (e.g. mario or "
            "mario:v1), starting with a letter or digit"
        )
    name = name.strip()
    for owner, is_its_name in (
        (bundled.NAME, bundled.is_bundled_name),
        (bundled_gemma3.NAME, bundled_gemma3.is_gemma3_name),
    ):
        if is_its_name(name):
            raise ValueError(
                f"{name!r} is a name of the bundled model {owner}; choose another name "
                f"(e.g. my-{name.replace(':', '-')})"
            )
    if name.partition(":")[0] in REMOTE_SOURCES or name.lower().endswith(".gguf"):
        raise ValueError(f"{name!r} looks like a remote name or a file; choose a plain name")
    return name


def load_profile(name: str) -> Modelfile | None:
    """The Modelfile of a created model, or None when `name` was not made by `create`."""
    manifest = read_manifest(name.strip()) if isinstance(name, str) else None
    if manifest is None or manifest.source != SOURCE:
        return None
    file = _modelfile_path(manifest.name)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return parse_modelfile(data["modelfile"], source=f"{file}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HubError(
            f"model {name!r} was created from a Modelfile, but {file} is unreadable "
            f"({e}); run `minillm create {name} -f Modelfile` again"
        ) from e


def create_model(
    name: str, modelfile: str | os.PathLike[str], *, text: str | None = None
) -> tuple[Manifest, Modelfile]:
    """Parse a Modelfile (a path, or `text` with `modelfile` naming where it came from), resolve
    its FROM, and register NAME. FROM may be a created model: its settings are inherited and
    this Modelfile's override them."""
    name = check_new_name(name)
    path = Path(modelfile).expanduser()
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no Modelfile at {path}") from None
    spec = parse_modelfile(text, source=str(path))
    base_name = spec.from_
    if not bundled.is_bundled_name(base_name) and read_manifest(base_name) is None:
        candidate = path.parent / Path(base_name).expanduser()  # relative to the Modelfile
        if candidate.exists():
            base_name = str(candidate.resolve())
    parent = load_profile(base_name)
    if parent is not None:
        spec = _inherit(parent, spec)
    try:
        ref = resolve(base_name)
    except ModelNotFoundError as e:  # say which instruction asked for it
        raise ModelNotFoundError(f"{path}: FROM {spec.from_!r}: {e}") from e
    if ref.format == "gguf":  # a corrupt base would only fail later, at `run` or `serve`
        try:
            check_gguf_model(ref.path)
        except GGUFError as e:
            raise GGUFError(f"{path}: FROM {spec.from_!r}: {e}") from None
    spec.from_ = ref.name if parent is None else parent.from_
    manifest = Manifest(
        name=name,
        source=SOURCE,
        path=str(ref.path),
        format=ref.format,
        size=tree_size(ref.path),
        pulled_at=now_iso(),
    )
    _write_json(_modelfile_path(name), {"name": name, "modelfile": spec.to_text()})
    write_manifest(manifest)
    return manifest, spec


def delete_profile(name: str) -> bool:
    file = _modelfile_path(name)
    if file.is_file():
        file.unlink()
        return True
    return False


def _inherit(parent: Modelfile, child: Modelfile) -> Modelfile:
    return Modelfile(
        from_=parent.from_,
        system=child.system if child.system is not None else parent.system,
        template=child.template if child.template is not None else parent.template,
        parameters={**parent.parameters, **child.parameters},
        messages=child.messages or parent.messages,
        license=child.license or parent.license,
    )


def _write_json(target: Path, data: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
