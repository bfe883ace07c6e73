"""The courseware conventions of CONTRIBUTING.md that a script can check.

Each check is a function returning a list of problems, tested on small synthetic notebooks (so
every check is known to be able to fail) and then run over whatever lessons, labs and homework
exist in the tree. With no lessons yet, the lesson checks pass over an empty list; the labs and
homework checks still run.
"""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO = Path(__file__).resolve().parent.parent
LESSON_NAME = re.compile(r"^(?P<number>\d{2})_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb$")
SOLUTION_MARKER = re.compile(r"#{3} (?:BEGIN|END) SOLUTION")
MAX_NOTEBOOK_BYTES = 1_500_000
MAX_IMAGE_BYTES = 200_000
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
ALLOWED_ERROR_MARKERS = ("NBVAL_RAISES_EXCEPTION",)


def _notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _heading_lines(cell) -> list[str]:
    return [line for line in cell.source.splitlines() if line.lstrip().startswith("#")]


# ---- checks ---------------------------------------------------------------------------------


def lesson_name_problems(names: list[str]) -> list[str]:
    """Lesson files are NN_snake_case.ipynb, each number used once."""
    problems, seen = [], {}
    for name in names:
        match = LESSON_NAME.match(name)
        if match is None:
            problems.append(f"{name}: lesson files are named NN_snake_case.ipynb")
            continue
        number = match["number"]
        if number in seen:
            problems.append(f"{name}: number {number} is also used by {seen[number]}")
        seen[number] = name
    return problems


def lesson_structure_problems(nb) -> list[str]:
    """The first markdown cell has a 学习目标 heading; one of the last cells a 思考题 heading."""
    problems = []
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    if not markdown or not any("学习目标" in h for h in _heading_lines(markdown[0])):
        problems.append("the first markdown cell needs a 学习目标 heading")
    if not any(
        c.cell_type == "markdown" and any("思考题" in h for h in _heading_lines(c))
        for c in nb.cells[-3:]
    ):
        problems.append("one of the last three cells needs a 思考题 heading")
    return problems


def notebook_problems(nb, size: int) -> list[str]:
    """Rules for every notebook: python3 kernel, small file, no stored errors, small images."""
    problems = []
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec is {kernel!r}, expected 'python3'")
    if size > MAX_NOTEBOOK_BYTES:
        problems.append(f"file is {size // 1000} KB, limit {MAX_NOTEBOOK_BYTES // 1000} KB")
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        allowed = any(m in cell.source for m in ALLOWED_ERROR_MARKERS) or "raises-exception" in (
            cell.metadata.get("tags", [])
        )
        for output in cell.get("outputs", []):
            if output.output_type == "error" and not allowed:
                problems.append(f"cell {index} stores an error output ({output.ename})")
            for mime in IMAGE_TYPES:
                data = output.get("data", {}).get(mime)
                if data is None:
                    continue
                text = "".join(data) if isinstance(data, list) else data
                raw = len(text.encode()) if mime == "image/svg+xml" else len(base64.b64decode(text))
                if raw > MAX_IMAGE_BYTES:
                    problems.append(f"cell {index} stores a {raw // 1000} KB {mime} image")
    return problems


def lab_problems(folder: Path) -> list[str]:
    """A lab is a folder with a notebook and an app.py defining build_demo()."""
    problems = []
    app = folder / "app.py"
    if not app.is_file():
        return [f"{folder.name}: app.py is missing"]
    tree = ast.parse(app.read_text("utf-8"))
    if not any(isinstance(n, ast.FunctionDef) and n.name == "build_demo" for n in tree.body):
        problems.append(f"{folder.name}: app.py defines no top-level build_demo()")
    if not _notebooks(folder):
        problems.append(f"{folder.name}: no notebook")
    return problems


def solution_leaks(folder: Path) -> list[str]:
    """Files under `folder` that contain a solution marker."""
    return [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and "__pycache__" not in p.parts
        and SOLUTION_MARKER.search(p.read_text("utf-8", errors="replace"))
    ]


# ---- the checks can fail --------------------------------------------------------------------


def _lesson(first: str = "# 第一课\n## 学习目标\n- a", last: str = "## 思考题\n1. b"):
    return new_notebook(
        cells=[new_markdown_cell(first), new_code_cell("1 + 1"), new_markdown_cell(last)],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )


def test_lesson_names():
    assert lesson_name_problems(["00_overview.ipynb", "01_transformer_step.ipynb"]) == []
    assert len(lesson_name_problems(["1_overview.ipynb", "02-sampling.ipynb", "03_KV.ipynb"])) == 3
    assert "also used" in lesson_name_problems(["04_a.ipynb", "04_b.ipynb"])[0]


def test_lesson_structure():
    assert lesson_structure_problems(_lesson()) == []
    assert len(lesson_structure_problems(_lesson(first="# 第一课\n学习目标 (not a heading)"))) == 1
    late = _lesson()
    late.cells = [late.cells[2], *late.cells[:2], new_code_cell("x"), new_code_cell("y")]
    assert lesson_structure_problems(late) == [
        "the first markdown cell needs a 学习目标 heading",
        "one of the last three cells needs a 思考题 heading",
    ]


def test_notebook_rules():
    nb = _lesson()
    assert notebook_problems(nb, 1000) == []
    nb.cells[1].outputs = [new_output("error", ename="ValueError", evalue="x", traceback=[])]
    big_png = base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()
    nb.cells.append(
        new_code_cell("plot()", outputs=[new_output("display_data", data={"image/png": big_png})])
    )
    nb.metadata.kernelspec["name"] = "julia"
    problems = notebook_problems(nb, MAX_NOTEBOOK_BYTES + 1)
    assert len(problems) == 4, problems
    nb.cells[1].source = "# NBVAL_RAISES_EXCEPTION\n1 / 0"
    assert len(notebook_problems(nb, 1000)) == 2  # the error is now expected


def test_lab_rules(tmp_path):
    lab = tmp_path / "lab9_demo"
    lab.mkdir()
    assert lab_problems(lab) == ["lab9_demo: app.py is missing"]
    (lab / "app.py").write_text("def build():\n    pass\n")
    assert len(lab_problems(lab)) == 2
    (lab / "app.py").write_text("def build_demo():\n    pass\n")
    nbformat.write(_lesson(), lab / "lab9_demo.ipynb")
    assert lab_problems(lab) == []


def test_solution_leaks_are_found(tmp_path):
    (tmp_path / "ok.py").write_text("raise NotImplementedError\n")
    (tmp_path / "leak.md").write_text("<!-- " + "#" * 3 + " END SOLUTION -->\n")
    assert solution_leaks(tmp_path) == ["leak.md"]


# ---- the tree follows them ------------------------------------------------------------------


def test_lessons_are_named_and_shaped():
    lessons = _notebooks(REPO / "lessons") if (REPO / "lessons").is_dir() else []
    # lessons/source/ holds the instructor copies (with solutions) the lessons are made from
    lessons = [p for p in lessons if p.parent != REPO / "lessons" / "source"]
    problems = lesson_name_problems([p.name for p in lessons if p.parent == REPO / "lessons"])
    problems += [
        f"{p.relative_to(REPO)}: lessons live directly in lessons/"
        for p in lessons
        if p.parent != REPO / "lessons"
    ]
    for path in lessons:
        problems += [f"{path.name}: {p}" for p in lesson_structure_problems(nbformat.read(path, 4))]
    assert not problems, "\n".join(problems)


COURSE_NOTEBOOKS = [
    p.relative_to(REPO)
    for folder in ("lessons", "labs", "homework")
    for p in _notebooks(REPO / folder)
]


@pytest.mark.parametrize("path", COURSE_NOTEBOOKS, ids=str)
def test_notebook_follows_the_rules(path):
    full = REPO / path
    assert notebook_problems(nbformat.read(full, as_version=4), full.stat().st_size) == []


# Lessons that draw their measured data (issue: "pictures where a student would rather look
# than read"); the size of every stored image is checked by notebook_problems above.
LESSONS_WITH_FIGURES = ("00", "01", "04", "09", "11", "12", "14", "15")


def stored_image_count(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if any(kind in out.get("data", {}) for kind in IMAGE_TYPES)
    )


def test_image_count_sees_stored_figures():
    nb = new_notebook(cells=[new_code_cell("x = 1")])
    assert stored_image_count(nb) == 0
    nb.cells.append(
        new_code_cell("plot()", outputs=[new_output("display_data", data={"image/png": "AA=="})])
    )
    assert stored_image_count(nb) == 1


@pytest.mark.parametrize("number", LESSONS_WITH_FIGURES)
def test_lesson_stores_a_figure(number):
    (path,) = (REPO / "lessons").glob(f"{number}_*.ipynb")
    assert stored_image_count(nbformat.read(path, as_version=4)) >= 1, f"{path.name}: no figure"


def test_labs_have_an_app_with_build_demo():
    labs = REPO / "labs"
    folders = (
        sorted(p for p in labs.iterdir() if p.is_dir() and p.name.startswith("lab"))
        if labs.is_dir()
        else []
    )
    problems = [problem for folder in folders for problem in lab_problems(folder)]
    assert not problems, "\n".join(problems)


def test_homework_has_student_copies_without_solutions():
    homework = REPO / "homework"
    copies = [p for p in sorted(homework.iterdir()) if p.is_dir() and p.name.startswith("hw")]
    assert copies, "homework/ has no assignment folders"
    for folder in copies:
        assert _notebooks(folder), f"{folder.name} has no notebook"
    leaks = [f"{folder.name}/{leak}" for folder in copies for leak in solution_leaks(folder)]
    assert not leaks, f"solution markers in student copies: {leaks}"
