"""Generate the student copies of the lessons from the instructor sources.

    lessons/source/NN_topic.ipynb  ->  lessons/NN_topic.ipynb

A source is the lesson with its exercises solved, inside the same `### BEGIN SOLUTION` /
`### END SOLUTION` regions as the homework (make_student_copies.strip_solutions does the
stripping). Unlike the homework, a lesson keeps its outputs: students read the measured
tables and figures. Those outputs come from running the *student copy* (so its exercise checks
show "尚未完成 (not done yet)"), and the generator carries them over: a code cell keeps the
outputs of the copy on disk when that cell (same id) has the same source there, and gets none
otherwise. Sources are stored without outputs. The workflow after editing a source:

    python scripts/make_lesson_copies.py                  # (re)write the copies
    jupyter nbconvert --to notebook --execute --inplace lessons/NN_topic.ipynb
    python scripts/make_lesson_copies.py --check          # exit 1 if any copy is out of date

`--check` reports a copy that differs from its source in anything but outputs, a code cell
that was never run (new or changed since the last run), and a source with stored outputs.
Lessons without a source are not generated (they have no exercises yet;
tests/test_lesson_exercises.py keeps that list). `make_student_copies.py` runs this too.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_student_copies  # noqa: E402

REPO_ROOT = make_student_copies.REPO_ROOT
# notebook metadata that running a notebook writes: it belongs to the copy, like the outputs
RUN_METADATA = ("language_info", "widgets")


def _carried(cell, before) -> bool:  # noqa: ANN001 - nbformat cells
    return before is not None and before.cell_type == "code" and before.source == cell.source


def student_lesson(source_text: str, on_disk: str | None, where: str = "<lesson>") -> str:
    """The student copy of a lesson: solutions stripped, outputs carried over from `on_disk`."""
    nb = copy.deepcopy(nbformat.reads(source_text, as_version=4))
    old = nbformat.reads(on_disk, as_version=4) if on_disk is not None else None
    old_cells = {c.get("id"): c for c in old.cells} if old is not None else {}
    for index, cell in enumerate(nb.cells):
        here = f"{where} cell {index}"
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            cell.source = make_student_copies.strip_solutions(
                cell.source, make_student_copies.TEXT_STUB, here
            )
            continue
        cell.source = make_student_copies.strip_solutions(
            cell.source, make_student_copies.CODE_STUB, here
        )
        before = old_cells.get(cell.get("id"))
        if _carried(cell, before):
            cell.outputs = before.outputs
            cell.execution_count = before.execution_count
            if "execution" in before.metadata:
                cell.metadata["execution"] = before.metadata["execution"]
        else:
            cell.outputs = []
            cell.execution_count = None
    for key in RUN_METADATA:
        nb.metadata.pop(key, None)
        if old is not None and key in old.metadata:
            nb.metadata[key] = old.metadata[key]
    return nbformat.writes(nb) + "\n"


def sources(lessons: Path) -> list[Path]:
    folder = lessons / "source"
    return sorted(folder.glob("*.ipynb")) if folder.is_dir() else []


def expected_lessons(lessons: Path) -> dict[str, str]:
    """Every generated lesson (file name) and its expected text, given the copies on disk."""
    expected = {}
    for source in sources(lessons):
        target = lessons / source.name
        on_disk = target.read_text("utf-8") if target.is_file() else None
        where = f"lessons/source/{source.name}"
        expected[source.name] = student_lesson(source.read_text("utf-8"), on_disk, where)
    return expected


def find_problems(lessons: Path, expected: dict[str, str]) -> list[str]:
    """Why the lesson copies are not what the sources make (empty when in sync)."""
    problems = []
    for name, text in expected.items():
        source = nbformat.read(lessons / "source" / name, as_version=4)
        if any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in source.cells):
            problems.append(
                f"lessons/source/{name} stores outputs: sources are kept without them "
                f"(jupyter nbconvert --clear-output --inplace lessons/source/{name})"
            )
        target = lessons / name
        if not target.is_file():
            problems.append(f"missing: lessons/{name}")
            continue
        if target.read_text("utf-8") != text:
            problems.append(f"out of date: lessons/{name} differs from lessons/source/{name}")
            continue
        never_run = [
            i
            for i, c in enumerate(nbformat.reads(text, as_version=4).cells)
            if c.cell_type == "code" and c.execution_count is None
        ]
        if never_run:
            problems.append(
                f"not run: lessons/{name} cells {never_run} have no outputs yet "
                f"(jupyter nbconvert --to notebook --execute --inplace lessons/{name})"
            )
    return problems


def main(argv: list[str] | None = None, print_: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    parser.add_argument("--lessons", type=Path, default=REPO_ROOT / "lessons")
    args = parser.parse_args(argv)
    expected = expected_lessons(args.lessons)
    if not args.check:
        for name, text in expected.items():
            target = args.lessons / name
            if not target.is_file() or target.read_text("utf-8") != text:
                target.write_text(text, "utf-8")
                print_(f"wrote lessons/{name}")
    problems = find_problems(args.lessons, expected)
    for problem in problems:
        print_(problem if args.check else f"warning: {problem}")
    if args.check and problems:
        print_("lesson copies are out of date: run python scripts/make_lesson_copies.py")
        return 1
    if args.check:
        print_(f"{len(expected)} lessons are in sync with lessons/source/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
