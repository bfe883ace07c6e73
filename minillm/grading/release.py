"""Find the pristine released notebook a submission is graded against.

The release is a folder of assignments (homework/ of the student release: one folder per
assignment, each with one notebook and its files). A submission names its assignment in its
notebook metadata (stamped by the generator); when a student's tool dropped it, the file name
decides, and last the cell ids it shares with each release notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat

from minillm.grading.markers import KEY

TEXT_ANSWER_SUFFIXES = (".md", ".txt")  # files a student may hand in beside the notebook


class ReleaseNotFound(LookupError):
    """No release notebook matches a submission; the message says where we looked."""


def default_release_root() -> Path | None:
    """homework/ of the checkout this package runs from (None for an installed package)."""
    root = Path(__file__).resolve().parents[2] / "homework"
    return root if root.is_dir() else None


def release_notebooks(root: Path) -> list[Path]:
    """Every released notebook under `root` (a notebook, an assignment or a homework folder)."""
    if root.is_file():
        return [root]
    found = sorted(root.glob("*.ipynb")) or sorted(root.glob("*/*.ipynb"))
    return [p for p in found if "source" not in p.relative_to(root).parts[:-1]]


def find_release(submission: Any, name: str, root: Path) -> Path:
    """The release notebook for a submission (its notebook object and file name)."""
    candidates = release_notebooks(root)
    if not candidates:
        raise ReleaseNotFound(f"no released notebook under {root}")
    if len(candidates) == 1:
        return candidates[0]
    wanted = submission.metadata.get(KEY, {}).get("assignment")
    for path in candidates:
        if wanted and path.stem == wanted:
            return path
    by_name = [p for p in candidates if p.stem in Path(name).stem]
    if len(by_name) == 1:
        return by_name[0]
    ids = {cell.get("id") for cell in submission.cells}
    overlap = {p: len(ids & {c.get("id") for c in read(p).cells}) for p in candidates}
    best = max(overlap.values())
    winners = [p for p, n in overlap.items() if n == best]
    if best == 0 or len(winners) > 1:
        names = ", ".join(p.stem for p in candidates)
        raise ReleaseNotFound(
            f"cannot tell which assignment {name} is (none of {names} by metadata, file name "
            "or cell ids); pass --release PATH_TO_THE_RELEASED_NOTEBOOK"
        )
    return winners[0]


def read(path: Path) -> Any:
    """A notebook, upgraded to nbformat 4 (ids are kept; old ones get none)."""
    return nbformat.read(path, as_version=4)


def text_answers(release_dir: Path) -> list[str]:
    """Names of the release's text files a student hands in (e.g. hw3's notes.md)."""
    return sorted(
        p.name for p in release_dir.iterdir() if p.is_file() and p.suffix in TEXT_ANSWER_SUFFIXES
    )
