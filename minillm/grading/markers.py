"""How a notebook says which cells are graded, and how a release stores it.

An instructor writes one marker line at the top of a grader cell in homework/source/:

    # GRADE: streaming (5 points)
    # GRADE: notes_quantization (2 points, by hand)

The generator of the student copies (scripts/make_student_copies.py) turns every marker into
cell metadata of the release, nbgrader-style, and marks the cells that held a solution:

    grader cell:  metadata["grading"] = {"grade": True, "grade_id": "streaming", "points": 5}
    by hand:      ... {"grade": True, "grade_id": "notes_quantization", "points": 2, "by_hand": True}
    answer cell:  metadata["grading"] = {"solution": True}
    notebook:     metadata["grading"] = {"assignment": "hw1_deploy_api"}

`minillm grade` reads only the release's metadata, never the submission's, so a student who
edits a marker or the metadata of their copy changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

KEY = "grading"
# The solution markers, spelled in two pieces: this file ships in the student release, whose
# check refuses any file that contains a marker line verbatim.
_HASHES = "###"
BEGIN = f"{_HASHES} BEGIN SOLUTION"
END = f"{_HASHES} END SOLUTION"

GRADE_LINE = re.compile(r"^\s*#\s*GRADE\b.*$", re.MULTILINE)
GRADE_MARKER = re.compile(
    r"^\s*#\s*GRADE:\s*(?P<part>[A-Za-z0-9_.-]+)\s*"
    r"\((?P<points>\d+)\s*points?(?P<by_hand>,\s*by hand)?\)\s*$"
)


@dataclass(frozen=True)
class Part:
    """One graded part: its name, its points, and whether a person gives them."""

    name: str
    points: int
    by_hand: bool = False


def parse_grade_marker(source: str) -> Part | None:
    """The part a grader cell's marker declares, None for other cells.

    A line that mentions GRADE but does not follow the format is an authoring mistake, and
    silently treating the cell as ungraded would hide points, so it raises.
    """
    line = GRADE_LINE.search(source)
    if line is None:
        return None
    match = GRADE_MARKER.match(line.group(0))
    if match is None:
        raise ValueError(
            f"malformed grade marker {line.group(0).strip()!r}; expected "
            "'# GRADE: part_name (N points)' or '# GRADE: part_name (N points, by hand)'"
        )
    return Part(match["part"], int(match["points"]), match["by_hand"] is not None)


def part_of(cell: Any) -> Part | None:
    """The part a release cell grades, read from its metadata (None for other cells)."""
    meta = cell.get("metadata", {}).get(KEY, {})
    if not meta.get("grade"):
        return None
    return Part(str(meta["grade_id"]), int(meta["points"]), bool(meta.get("by_hand", False)))


def is_answer(cell: Any) -> bool:
    """True for a cell whose content the student writes (it held a solution in the source)."""
    return bool(cell.get("metadata", {}).get(KEY, {}).get("solution"))


def stamp_release(nb: Any, source_cells: list[Any], assignment: str) -> None:
    """Write the grading metadata into a student copy `nb`, from its source's cells.

    `source_cells[i]` is the instructor's version of `nb.cells[i]`: a cell is an answer cell
    when its source held a solution region, and a grader cell when it carries a marker.
    Grader cells are also made read-only in JupyterLab (a courtesy: the protection is that
    `minillm grade` restores them from the release).
    """
    seen: dict[str, str] = {}
    for cell, source in zip(nb.cells, source_cells, strict=True):
        cell.metadata.pop(KEY, None)
        part = parse_grade_marker(cell.source) if cell.cell_type == "code" else None
        if BEGIN in source.source:
            if part is not None:
                raise ValueError(f"cell {cell.get('id')}: a grader cell cannot hold a solution")
            cell.metadata[KEY] = {"solution": True}
        elif part is not None:
            if part.name in seen:
                raise ValueError(
                    f"part {part.name!r} is graded twice (cells {seen[part.name]} and "
                    f"{cell.get('id')})"
                )
            seen[part.name] = str(cell.get("id"))
            meta: dict[str, Any] = {"grade": True, "grade_id": part.name, "points": part.points}
            if part.by_hand:
                meta["by_hand"] = True
            cell.metadata[KEY] = meta
            cell.metadata["editable"] = False
            cell.metadata["deletable"] = False
    nb.metadata[KEY] = {"assignment": assignment}
