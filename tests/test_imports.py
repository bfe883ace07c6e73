"""Import hygiene of the engine, read from the source (ast), so no module has to be imported.

1. No cycles inside a package folder, counting imports inside functions too: a lazy import
   that only hides a cycle (compress/quantize.py importing awq.py, which imported quantize.py)
   still ties the two modules together.
2. No module imports another module's private (_underscore) name: a name shared by two modules
   is public, in the module that owns it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_scan_sees_the_engine():
    assert "minillm.compress.quantize" in MODULES and "minillm.kernels.cpu" in MODULES
    pairs = imports_of(MODULES["minillm.compress.quantize"])
    assert ("minillm.compress.awq", ["awq_scale_model"]) in pairs


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_lazy_cycle():
    assert cycle_in({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    "folder",
    [
        "compress",
        "kernels",
        "hub",
        "engine",
        "model",
        "kv",
        "serve",
        "formats",
        "parallel",
        "gateway",
    ],
)
def test_imports_inside_a_folder_flow_one_way(folder):
    prefix = f"minillm.{folder}."
    graph = {
        name: {m for m, _ in imports_of(path) if m.startswith(prefix) and m != name}
        for name, path in MODULES.items()
        if name.startswith(prefix)
    }
    assert cycle_in(graph) is None, " -> ".join(cycle_in(graph) or [])


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in MODULES.items():
        for module, names in imports_of(path):
            if not module.startswith("minillm") or module == name:
                continue
            for imported in names:
                if not imported.startswith("_") or imported.startswith("__"):
                    continue
                offenders.append(f"{name} imports {imported} from {module}")
    assert not offenders, "\n".join(offenders)
