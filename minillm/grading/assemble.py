"""Build the notebook that is executed: the release's cells, with the student's answers in them.

nbgrader restores a locked cell when its checksum differs from the source's, and re-adds a
grade cell that was deleted; it finds those cells through the submission's own metadata. Here
the release drives instead: every cell of the executed notebook is the release's cell, in the
release's order, and only the *source* of an answer cell comes from the submission, matched
by cell id. So a grader cell that was edited, deleted, moved, re-labelled or given new
metadata is simply the release's again, and cells the student added are not run. Each
release code cell that the submission does not hold unchanged is reported as tampered.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from typing import Any

from minillm.grading.markers import is_answer


@dataclass
class Assembly:
    """The notebook to execute and what assembling it found."""

    notebook: Any
    tampered: list[str] = field(default_factory=list)  # release code cells edited or deleted
    missing_answers: list[str] = field(default_factory=list)  # answer cells not found
    ignored: list[str] = field(default_factory=list)  # submission cells that are not run


def defined_names(source: str) -> set[str]:
    """Top-level functions and classes a cell defines (empty when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in tree.body if isinstance(node, kinds)}


def _answer_source(release_cell: Any, by_id: dict[str, Any], unmatched: list[Any]) -> str | None:
    """The student's source for one answer cell: by id, else by the functions it defines.

    The fallback keeps a student who re-created a cell (new id) from losing the part: the
    submission cell that defines the same functions as the stub is the answer.
    """
    cell = by_id.get(release_cell.get("id"))
    if cell is not None and cell.cell_type == release_cell.cell_type:
        return cell.source
    wanted = defined_names(release_cell.source)
    if release_cell.cell_type != "code" or not wanted:
        return None
    for candidate in unmatched:
        if candidate.cell_type == "code" and wanted <= defined_names(candidate.source):
            unmatched.remove(candidate)
            return candidate.source
    return None


def assemble(release: Any, submission: Any) -> Assembly:
    """The release notebook with the submission's answers; see the module docstring."""
    by_id: dict[str, Any] = {}
    for cell in submission.cells:
        by_id.setdefault(cell.get("id"), cell)
    release_ids = {cell.get("id") for cell in release.cells}
    answer_ids = {cell.get("id") for cell in release.cells if is_answer(cell)}
    unmatched = [c for c in submission.cells if c.get("id") not in release_ids]

    nb = copy.deepcopy(release)
    result = Assembly(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        if is_answer(cell):
            source = _answer_source(cell, by_id, unmatched)
            if source is None:
                result.missing_answers.append(str(cell.get("id")))
            else:
                cell.source = source
            continue
        if cell.cell_type != "code":
            continue  # instructions are the release's; an edited one changes nothing
        theirs = by_id.get(cell.get("id"))
        if theirs is None or theirs.cell_type != "code" or theirs.source != cell.source:
            result.tampered.append(str(cell.get("id")))
    result.ignored = [
        str(c.get("id"))
        for c in unmatched
        if c.get("id") not in answer_ids and (c.cell_type == "code" and c.source.strip())
    ]
    return result
