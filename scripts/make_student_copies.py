"""Generate the student copies of the homework from the instructor sources.

    homework/source/<hw>/<file>  ->  homework/<hw>/<file>

Solution regions (nbgrader style) are delimited by a line containing `### BEGIN SOLUTION` and
one containing `### END SOLUTION`. In code (notebook code cells, .py files) a region becomes
`raise NotImplementedError` at the indentation of the BEGIN line; in prose (markdown cells, .md
and other text files) it becomes a TODO line. Notebook outputs and execution counts are
cleared. Other files are copied as they are.

    python scripts/make_student_copies.py           # (re)write the copies
    python scripts/make_student_copies.py --check   # exit 1 if any copy is out of date

From the command line it also (re)writes or checks the lessons' copies, lessons/source/ ->
lessons/, through scripts/make_lesson_copies.py, which builds on this module.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

from minillm.grading.markers import stamp_release

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_STUB = "raise NotImplementedError  # TODO: 你的实现 (your implementation)"
TEXT_STUB = "TODO: 在这里写你自己的内容 (write your own text here)"
CODE_SUFFIXES = {".py"}
TEXT_SUFFIXES = {".md", ".txt", ".rst", ".toml", ".cfg", ".ini", ".yml", ".yaml", ".json"}
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def strip_solutions(text: str, stub: str, where: str = "<text>") -> str:
    """Replace each solution region of `text` by `stub`, indented like the BEGIN line."""
    out: list[str] = []
    begin_line = None
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if BEGIN in line:
            if begin_line is not None:
                raise ValueError(f"{where}:{number}: nested {BEGIN!r} (open since {begin_line})")
            begin_line = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}{stub}\n")
        elif END in line:
            if begin_line is None:
                raise ValueError(f"{where}:{number}: {END!r} without {BEGIN!r}")
            begin_line = None
        elif begin_line is None:
            out.append(line)
    if begin_line is not None:
        raise ValueError(f"{where}:{begin_line}: {BEGIN!r} is never closed")
    result = "".join(out)
    if text and not text.endswith("\n"):
        result = result.removesuffix("\n")  # keep a cell's missing final newline missing
    return result


def student_notebook(text: str, where: str = "<notebook>", assignment: str | None = None) -> str:
    """The student copy of a notebook (JSON text in, JSON text out).

    With `assignment` (homework), the copy is a release `minillm grade` grades against: every
    cell must have a stable nbformat 4.5 id, and grader and answer cells get their metadata
    (minillm/grading/markers.py).
    """
    source = nbformat.reads(text, as_version=4)
    nb = copy.deepcopy(source)
    if assignment is not None:
        missing = [i for i, cell in enumerate(nb.cells) if not cell.get("id")]
        if missing or (nb.nbformat, nb.nbformat_minor) < (4, 5):
            raise ValueError(
                f"{where}: cells {missing} have no id (nbformat >= 4.5 is needed for grading); "
                "run python scripts/make_student_copies.py to add them"
            )
    for index, cell in enumerate(nb.cells):
        here = f"{where} cell {index}"
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, CODE_STUB, here)
            cell.outputs = []
            cell.execution_count = None
        else:
            cell.source = strip_solutions(cell.source, TEXT_STUB, here)
        cell.metadata.pop("execution", None)
    if assignment is not None:
        try:
            stamp_release(nb, source.cells, assignment)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return nbformat.writes(nb) + "\n"


def add_missing_ids(source: Path) -> list[Path]:
    """Give every cell of the notebooks under `source` an id, written back (ids must be stable)."""
    changed = []
    for path in sorted(source.rglob("*.ipynb")):
        if SKIPPED_DIRS.intersection(path.relative_to(source).parts):
            continue
        nb = nbformat.read(path, as_version=4)
        taken = {cell.get("id") for cell in nb.cells}
        if all(taken) and (nb.nbformat, nb.nbformat_minor) >= (4, 5):
            continue
        nb.nbformat_minor = max(nb.nbformat_minor, 5)
        for index, cell in enumerate(nb.cells):
            if not cell.get("id"):
                candidate, n = f"{path.stem[:12]}-{index:02d}", 0
                while candidate in taken:
                    n += 1
                    candidate = f"{path.stem[:12]}-{index:02d}-{n}"
                cell["id"] = candidate
                taken.add(candidate)
        nbformat.write(nb, path)
        changed.append(path)
    return changed


def student_file(path: Path, where: str, assignment: str | None = None) -> bytes:
    """The student copy of one source file, as bytes."""
    if path.suffix == ".ipynb":
        return student_notebook(path.read_text("utf-8"), where, assignment).encode("utf-8")
    if path.suffix in CODE_SUFFIXES:
        return strip_solutions(path.read_text("utf-8"), CODE_STUB, where).encode("utf-8")
    if path.suffix in TEXT_SUFFIXES:
        return strip_solutions(path.read_text("utf-8"), TEXT_STUB, where).encode("utf-8")
    return path.read_bytes()


def _files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(root).parts)
    )


def expected_copies(homework: Path) -> dict[Path, bytes]:
    """Every student file (path relative to `homework`) and its expected content."""
    source = homework / "source"
    expected: dict[Path, bytes] = {}
    for assignment in sorted(p for p in source.iterdir() if p.is_dir()):
        for path in _files(assignment):
            relative = path.relative_to(source)
            where = f"homework/source/{relative}"
            expected[relative] = student_file(path, where, assignment=assignment.name)
    return expected


def find_problems(homework: Path, expected: dict[Path, bytes]) -> list[str]:
    """Differences between the copies on disk and the expected ones (empty when in sync)."""
    problems: list[str] = []
    for relative, content in expected.items():
        target = homework / relative
        if not target.is_file():
            problems.append(f"missing: homework/{relative}")
        elif target.read_bytes() != content:
            old = target.read_text("utf-8", errors="replace").splitlines()
            new = content.decode("utf-8", errors="replace").splitlines()
            diff = list(difflib.unified_diff(old, new, "on disk", "expected", lineterm="", n=0))
            changed = sum(1 for d in diff[2:] if d[:1] in "+-")
            preview = "\n".join("    " + d for d in diff[2:8])
            problems.append(f"out of date: homework/{relative} ({changed} lines differ)\n{preview}")
    for assignment in {relative.parts[0] for relative in expected}:
        for path in _files(homework / assignment):
            if path.relative_to(homework) not in expected:
                problems.append(f"not generated from a source: {path.relative_to(homework)}")
    return problems


def write_copies(homework: Path, expected: dict[Path, bytes]) -> list[Path]:
    """Write the copies that differ; return the paths written."""
    written = []
    for relative, content in expected.items():
        target = homework / relative
        if target.is_file() and target.read_bytes() == content:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        written.append(relative)
    return written


def main(argv: list[str] | None = None, print_: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    parser.add_argument("--homework", type=Path, default=REPO_ROOT / "homework")
    args = parser.parse_args(argv)
    if not args.check:
        for path in add_missing_ids(args.homework / "source"):
            print_(f"added cell ids to {path}")
    expected = expected_copies(args.homework)
    if args.check:
        problems = find_problems(args.homework, expected)
        for problem in problems:
            print_(problem)
        if problems:
            print_("student copies are out of date: run python scripts/make_student_copies.py")
            return 1
        print_(f"{len(expected)} student files are in sync with homework/source/")
        return 0
    for relative in write_copies(args.homework, expected):
        print_(f"wrote homework/{relative}")
    for problem in find_problems(args.homework, expected):
        print_(f"warning: {problem} (remove it by hand if it is stale)")
    return 0


if __name__ == "__main__":
    import make_lesson_copies  # the lessons' copies (lessons/source/ -> lessons/) reuse this module

    lesson_args = ["--check"] if "--check" in sys.argv[1:] else []
    sys.exit(max(main(), make_lesson_copies.main(lesson_args)))
