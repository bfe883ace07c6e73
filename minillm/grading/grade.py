"""Grade one submission, or a folder of them, against the pristine release.

    assemble (release cells + the student's answers)  ->  run in a fresh kernel, offline,
    every answer and grader cell under the per-part limit  ->  points from the release's
    metadata for each grader cell that ran without an error.

The kernel runs in a scratch folder holding the release's files for the assignment, with the
student's text answers (e.g. notes.md) laid over them; nothing else of the student's is
copied, so a submitted `torch.py` cannot shadow a module.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat

from minillm.grading.assemble import assemble
from minillm.grading.execute import run_notebook
from minillm.grading.markers import is_answer, part_of
from minillm.grading.release import (
    ReleaseNotFound,
    default_release_root,
    find_release,
    read,
    text_answers,
)
from minillm.grading.report import HandPart, PartResult, Report

DEFAULT_TIMEOUT_PER_PART = 120.0
SETUP_TIMEOUT = 600.0  # instruction cells that load a model get at least this long
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}


def _stage(release_dir: Path, answers_from: Path | None, workdir: Path) -> None:
    for path in release_dir.iterdir():
        if path.name in SKIPPED_DIRS or path.suffix == ".ipynb":
            continue
        if path.is_dir():
            shutil.copytree(path, workdir / path.name)
        else:
            shutil.copy2(path, workdir / path.name)
    if answers_from is not None:
        for name in text_answers(release_dir):
            theirs = answers_from / name
            if theirs.is_file():
                shutil.copyfile(theirs, workdir / name)


def _report(nb: Any, results: dict, submission: str, assignment: str) -> Report:
    report = Report(submission, assignment, parts=[])
    for index, cell in enumerate(nb.cells):
        part = part_of(cell)
        if part is None:
            continue
        result = results.get(index)
        status = result.status if result else "not run"
        error = result.error if result else None
        if part.by_hand:
            report.by_hand.append(HandPart(part.name, part.points, status == "ok", error))
        else:
            earned = part.points if status == "ok" else 0
            report.parts.append(PartResult(part.name, earned, part.points, status, error))
    return report


def grade_notebook(
    submission: Path,
    release: Path | None = None,
    timeout_per_part: float = DEFAULT_TIMEOUT_PER_PART,
    answers_from: Path | None = None,
    executed: Path | None = None,
    text_answers_beside: bool = True,
) -> Report:
    """Grade one submitted notebook; `release` is a notebook or a folder of assignments.

    `answers_from` is the folder whose text answers (notes.md ...) are used; by default the
    submission's own folder, or none with `text_answers_beside=False` (then the release's
    templates stand). `executed`, when given, receives the executed notebook.
    """
    started = time.monotonic()
    root = release if release is not None else default_release_root()
    if root is None:
        raise ReleaseNotFound("no homework/ folder beside this package: pass --release PATH")
    theirs = read(submission)
    release_path = find_release(theirs, submission.name, root)
    assembly = assemble(read(release_path), theirs)
    nb = assembly.notebook

    def timeout_of(cell: Any) -> float:
        if is_answer(cell) or part_of(cell) is not None:
            return timeout_per_part
        return max(timeout_per_part, SETUP_TIMEOUT)

    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        workdir = Path(tmp)
        if answers_from is None and text_answers_beside:
            answers_from = submission.parent
        _stage(release_path.parent, answers_from, workdir)
        results = run_notebook(nb, workdir, timeout_of)
    if executed is not None:
        nbformat.write(nb, executed)
    assignment = nb.metadata.get("grading", {}).get("assignment") or release_path.stem
    report = _report(nb, results, str(submission), assignment)
    report.tampered = assembly.tampered
    report.missing_answers = assembly.missing_answers
    report.ignored_cells = assembly.ignored
    report.seconds = round(time.monotonic() - started, 1)
    return report


def submissions_in(folder: Path) -> list[tuple[str, Path, Path | None]]:
    """(student, notebook, folder of text answers) for each submission in `folder`.

    Either one notebook per student directly in `folder` (the student is the file name;
    text answers cannot be told apart there, so the release's templates are used), or one
    sub-folder per student holding the notebook and its text answers.
    """
    found: list[tuple[str, Path, Path | None]] = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix == ".ipynb":
            found.append((path.stem, path, None))
        elif path.is_dir() and path.name not in SKIPPED_DIRS:
            notebooks = sorted(path.glob("*.ipynb"))
            for nb in notebooks:
                student = path.name if len(notebooks) == 1 else f"{path.name}/{nb.stem}"
                found.append((student, nb, path))
    return found


def grade_folder(
    folder: Path, release: Path | None = None, timeout_per_part: float = DEFAULT_TIMEOUT_PER_PART
) -> list[tuple[str, Report | str]]:
    """Grade every submission in `folder`; a submission that cannot be graded gets its reason."""
    graded: list[tuple[str, Report | str]] = []
    for student, notebook, answers in submissions_in(folder):
        try:
            report = grade_notebook(
                notebook,
                release,
                timeout_per_part,
                answers_from=answers,
                text_answers_beside=answers is not None,
            )
        except (ReleaseNotFound, nbformat.reader.NotJSONError, ValueError, OSError) as exc:
            graded.append((student, f"{type(exc).__name__}: {exc}"))
        else:
            graded.append((student, report))
    return graded
