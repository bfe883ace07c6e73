"""`minillm grade` on a small made-up assignment: assembly, tampering, isolation, limits, CSV.

The assignment (hw9_demo) is written here as an instructor source with solution regions and
released by the real generator (scripts/make_student_copies.py), then graded in real kernels.
Its parts are pure Python, so each grading run costs a kernel start, not a model load; the
real homework is graded in tests/test_grading_homework.py.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minillm.cli import main as cli_main
from minillm.grading import grade_notebook
from minillm.grading.assemble import assemble
from minillm.grading.markers import Part, parse_grade_marker, part_of

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_student_copies", REPO / "scripts" / "make_student_copies.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_student_copies", module)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()

CELLS = [
    ("md-0", "markdown", "# Demo homework\nThree parts."),
    ("setup", "code", "import fractions\nimport math\n\nBASE = 10  # used by every grader"),
    ("ans-add", "code", f"def add(a, b):\n    {BEGIN}\n    return a + b\n    {END}"),
    (
        "grade-add",
        "code",
        "# GRADE: add (2 points)\nassert add(2, 3) == 5\nassert add(BASE, -1) == 9",
    ),
    ("ans-mul", "code", f"def mul(a, b):\n    {BEGIN}\n    return a * b\n    {END}"),
    (
        "grade-mul",
        "code",
        "# GRADE: mul (3 points)\n# uses only mul: add is part 1's\nassert mul(3, 4) == 12\n"
        "assert mul(BASE, 0) == 0",
    ),
    ("ans-root", "code", f"def root(x):\n    {BEGIN}\n    return math.sqrt(x)\n    {END}"),
    ("grade-root", "code", "# GRADE: root (4 points)\nassert root(BASE * 10) == 10.0"),
    ("ans-essay", "markdown", f"## Essay\n<!-- {BEGIN} -->\nA fine essay.\n<!-- {END} -->"),
    (
        "check-essay",
        "code",
        "# GRADE: essay (2 points, by hand)\n"
        "text = open('essay.md', encoding='utf-8').read()\n"
        "if 'TODO' in text:\n    raise NotImplementedError('essay.md still holds the TODO')",
    ),
]
ESSAY = f"# Essay\n<!-- {BEGIN} -->\nMy own words.\n<!-- {END} -->\n"
MAX = 2 + 3 + 4


def _source_notebook() -> nbformat.NotebookNode:
    cells = []
    for cell_id, kind, text in CELLS:
        cell = new_code_cell(text) if kind == "code" else new_markdown_cell(text)
        cell["id"] = cell_id
        cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """homework/ with source/hw9_demo and its generated release hw9_demo."""
    homework = tmp_path_factory.mktemp("course") / "homework"
    source = homework / "source" / "hw9_demo"
    source.mkdir(parents=True)
    nbformat.write(_source_notebook(), source / "hw9_demo.ipynb")
    (source / "essay.md").write_text(ESSAY, "utf-8")
    assert generator.main(["--homework", str(homework)], print_=lambda _: None) == 0
    return homework


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not left, f"grading left processes behind: {[p.cmdline() for p in left]}"


def release_of(course: Path) -> nbformat.NotebookNode:
    return nbformat.read(course / "hw9_demo" / "hw9_demo.ipynb", as_version=4)


def with_answers(nb: nbformat.NotebookNode, **sources: str) -> nbformat.NotebookNode:
    """A copy of `nb` whose cells (by id, '-' for '_') get new sources."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        key = cell.id.replace("-", "_")
        if key in sources:
            cell.source = sources[key]
    return nb


def submit(tmp_path: Path, nb: nbformat.NotebookNode, name: str = "hw9_demo.ipynb") -> Path:
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def points(report) -> dict[str, int]:
    return {p.name: p.points for p in report.parts}


# ---- markers and the release ----------------------------------------------------------------


def test_markers_parse_points_and_by_hand_parts():
    assert parse_grade_marker("# GRADE: add (2 points)\nx") == Part("add", 2)
    assert parse_grade_marker("x = 1\n# GRADE: one (1 point)") == Part("one", 1)
    assert parse_grade_marker("# GRADE: notes (2 points, by hand)") == Part("notes", 2, True)
    assert parse_grade_marker("print('no marker')") is None
    with pytest.raises(ValueError, match="malformed grade marker"):
        parse_grade_marker("# GRADE: add two points")


def test_release_carries_grading_metadata_and_no_solution(course):
    nb = release_of(course)
    assert nb.metadata["grading"] == {"assignment": "hw9_demo"}
    parts = {cell.id: part_of(cell) for cell in nb.cells if part_of(cell)}
    assert parts == {
        "grade-add": Part("add", 2),
        "grade-mul": Part("mul", 3),
        "grade-root": Part("root", 4),
        "check-essay": Part("essay", 2, True),
    }
    answers = [cell.id for cell in nb.cells if cell.metadata.get("grading", {}).get("solution")]
    assert answers == ["ans-add", "ans-mul", "ans-root", "ans-essay"]
    grader = next(c for c in nb.cells if c.id == "grade-add")
    assert grader.metadata["editable"] is False and grader.metadata["deletable"] is False
    assert BEGIN not in nbformat.writes(nb) and "a + b" not in nbformat.writes(nb)


def test_generator_adds_missing_ids_to_sources_and_refuses_copies_without(tmp_path):
    homework = tmp_path / "homework"
    source = homework / "source" / "hw9_demo"
    source.mkdir(parents=True)
    nb = _source_notebook()
    for cell in nb.cells:
        del cell["id"]
    nb.nbformat_minor = 4
    text = nbformat.writes(nb, version=4)
    (source / "hw9_demo.ipynb").write_text(text, "utf-8")
    with pytest.raises(ValueError, match="no id"):
        generator.student_notebook(text, "hw9_demo.ipynb", assignment="hw9_demo")
    assert generator.main(["--homework", str(homework)], print_=lambda _: None) == 0
    ids = [c.id for c in nbformat.read(source / "hw9_demo.ipynb", as_version=4).cells]
    assert all(ids) and len(set(ids)) == len(ids)
    released = nbformat.read(homework / "hw9_demo" / "hw9_demo.ipynb", as_version=4)
    assert [c.id for c in released.cells] == ids  # the copy keeps the source's ids
    assert generator.main(["--homework", str(homework)], print_=lambda _: None) == 0
    assert [c.id for c in nbformat.read(source / "hw9_demo.ipynb", as_version=4).cells] == ids


def test_a_part_graded_twice_is_an_authoring_error():
    nb = _source_notebook()
    nb.cells[5].source = nb.cells[5].source.replace("GRADE: mul", "GRADE: add")
    with pytest.raises(ValueError, match="graded twice"):
        generator.student_notebook(nbformat.writes(nb), "x.ipynb", assignment="hw9_demo")


# ---- assembly (no kernel) -------------------------------------------------------------------


def test_assembly_takes_answers_by_id_and_everything_else_from_the_release(course):
    release = release_of(course)
    theirs = with_answers(
        release,
        ans_add="def add(a, b):\n    return a + b",
        grade_add="# GRADE: add (2 points)\nprint('trust me')",  # edited
        setup="BASE = 0",  # edited instruction code
        md_0="# my notes",  # edited prose: restored, not reported
    )
    theirs.cells = [c for c in theirs.cells if c.id != "grade-mul"]  # deleted
    extra = new_code_cell("import builtins  # my scratch cell")
    extra["id"] = "mine"
    theirs.cells.insert(2, extra)
    theirs.cells.reverse()  # moved around
    result = assemble(release, theirs)
    got = {c.id: c.source for c in result.notebook.cells}
    assert [c.id for c in result.notebook.cells] == [c.id for c in release.cells]
    assert got["ans-add"] == "def add(a, b):\n    return a + b"
    for cell_id in ("grade-add", "grade-mul", "setup", "md-0"):
        assert got[cell_id] == next(c.source for c in release.cells if c.id == cell_id)
    assert sorted(result.tampered) == ["grade-add", "grade-mul", "setup"]
    assert result.ignored == ["mine"]
    assert result.missing_answers == []


def test_a_recreated_answer_cell_is_found_by_the_function_it_defines(course):
    release = release_of(course)
    theirs = copy.deepcopy(release)
    for cell in theirs.cells:
        if cell.id == "ans-mul":
            cell["id"] = "new-cell-id"
            cell.source = "# my version\ndef mul(a, b):\n    return a * b"
    result = assemble(release, theirs)
    got = next(c.source for c in result.notebook.cells if c.id == "ans-mul")
    assert got.startswith("# my version")
    assert result.missing_answers == [] and result.ignored == []


# ---- grading in a kernel --------------------------------------------------------------------


def test_untouched_release_scores_zero_and_the_source_full_marks(course):
    release = course / "hw9_demo" / "hw9_demo.ipynb"
    untouched = grade_notebook(release, course)
    assert points(untouched) == {"add": 0, "mul": 0, "root": 0}
    assert {p.error.split(":")[0] for p in untouched.parts} == {"NotImplementedError"}
    assert [(h.name, h.present) for h in untouched.by_hand] == [("essay", False)]
    assert untouched.total == 0 and untouched.max == MAX and untouched.tampered == []

    source = grade_notebook(course / "source" / "hw9_demo" / "hw9_demo.ipynb", course)
    assert points(source) == {"add": 2, "mul": 3, "root": 4} and source.total == MAX
    assert [(h.name, h.present) for h in source.by_hand] == [("essay", True)]
    assert source.tampered == []


def test_an_unfinished_part_costs_only_its_own_points(course, tmp_path):
    theirs = with_answers(
        release_of(course),
        ans_mul="def mul(a, b):\n    return a * b",
        ans_root="def root(x):\n    return x ** 0.5",
    )
    report = grade_notebook(submit(tmp_path, theirs), course)
    assert points(report) == {"add": 0, "mul": 3, "root": 4}


def test_edited_and_deleted_graders_are_restored_and_reported(course, tmp_path):
    theirs = with_answers(
        release_of(course),
        ans_add="def add(a, b):\n    return a - b  # wrong",
        grade_add="# GRADE: add (2 points)\nassert True",
        ans_mul="def mul(a, b):\n    return a * b",
    )
    theirs.cells = [c for c in theirs.cells if c.id != "grade-mul"]
    for cell in theirs.cells:
        if cell.id == "grade-root":
            cell.metadata["grading"]["points"] = 100  # a bigger part, in their copy only
    report = grade_notebook(submit(tmp_path, theirs), course)
    assert points(report) == {"add": 0, "mul": 3, "root": 0}
    assert report.max == MAX
    assert sorted(report.tampered) == ["grade-add", "grade-mul"]


def test_an_answer_cell_posing_as_a_grader_scores_as_if_the_grader_were_intact(course, tmp_path):
    """The answer carries the grader's marker and metadata; the real grader is deleted."""
    theirs = with_answers(
        release_of(course),
        ans_root="# GRADE: root (4 points)\ndef root(x):\n    raise NotImplementedError",
    )
    for cell in theirs.cells:
        if cell.id == "ans-root":
            cell.metadata["grading"] = {"grade": True, "grade_id": "root", "points": 40}
    theirs.cells = [c for c in theirs.cells if c.id != "grade-root"]
    report = grade_notebook(submit(tmp_path, theirs), course)
    assert points(report) == {"add": 0, "mul": 0, "root": 0} and report.max == MAX
    assert report.tampered == ["grade-root"]
    root = next(p for p in report.parts if p.name == "root")
    assert root.error.startswith("NotImplementedError")  # the release's grader ran


def test_a_part_that_runs_forever_is_stopped_and_costs_only_that_part(course, tmp_path):
    theirs = with_answers(
        release_of(course),
        ans_add="def add(a, b):\n    return a + b",
        ans_mul="def mul(a, b):\n    while True:\n        pass",
        ans_root="import time\nwhile True:  # hangs when the cell runs\n    time.sleep(0.1)",
    )
    report = grade_notebook(submit(tmp_path, theirs), course, timeout_per_part=5)
    by_name = {p.name: p for p in report.parts}
    assert points(report) == {"add": 2, "mul": 0, "root": 0}
    assert by_name["mul"].status == "timeout" and "5 s" in by_name["mul"].error
    assert by_name["root"].status == "error"  # its answer cell hung: root is undefined
    assert report.by_hand[0].name == "essay"  # the run went on after both hangs

    fixed = with_answers(theirs, ans_root="def root(x):\n    return math.sqrt(x)")
    report = grade_notebook(submit(tmp_path, fixed, "fixed.ipynb"), course, timeout_per_part=5)
    assert points(report) == {"add": 2, "mul": 0, "root": 4}  # setup replayed after the hang


def test_a_kernel_killed_by_the_answer_costs_only_that_part(course, tmp_path):
    theirs = with_answers(
        release_of(course),
        ans_add="def add(a, b):\n    import os\n    os._exit(3)",
        ans_mul="def mul(a, b):\n    return a * b",
        ans_root="def root(x):\n    return math.sqrt(x)",
    )
    report = grade_notebook(submit(tmp_path, theirs), course)
    assert points(report) == {"add": 0, "mul": 3, "root": 4}
    assert next(p for p in report.parts if p.name == "add").status == "dead"


def test_text_answers_come_from_beside_the_submission_and_code_files_do_not(course, tmp_path):
    theirs = release_of(course)
    (tmp_path / "essay.md").write_text("# Essay\nMy own words.\n", "utf-8")
    (tmp_path / "fractions.py").write_text("raise SystemExit('shadowed')\n", "utf-8")
    report = grade_notebook(submit(tmp_path, theirs), course)
    assert [(h.name, h.present) for h in report.by_hand] == [("essay", True)]
    assert report.total == 0  # the presence of an essay earns nothing automatically
    setup_ok = all(p.error.startswith("NotImplementedError") for p in report.parts)
    assert setup_ok, "the student's fractions.py must not be importable in the grading kernel"


# ---- the command line -----------------------------------------------------------------------


def test_cli_json_for_one_submission(course, tmp_path, capsys):
    theirs = with_answers(release_of(course), ans_add="def add(a, b):\n    return a + b")
    theirs.cells = [c for c in theirs.cells if c.id != "grade-root"]
    path = submit(tmp_path, theirs, "alice_hw9_demo.ipynb")
    assert cli_main(["grade", str(path), "--release", str(course), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"total", "max", "parts", "tampered"} <= set(data)
    assert (data["total"], data["max"], data["tampered"]) == (2, MAX, ["grade-root"])
    assert [(p["name"], p["points"], p["max"]) for p in data["parts"]] == [
        ("add", 2, 2),
        ("mul", 0, 3),
        ("root", 0, 4),
    ]


def test_cli_grades_a_folder_into_one_csv(course, tmp_path, capsys):
    release = release_of(course)
    folder = tmp_path / "submissions"
    folder.mkdir()
    nbformat.write(release, folder / "carol.ipynb")  # untouched
    bob = with_answers(release, ans_mul="def mul(a, b):\n    return a * b")
    bob.cells = [c for c in bob.cells if c.id != "grade-add"]
    nbformat.write(bob, folder / "bob.ipynb")
    (folder / "alice").mkdir()  # a folder per student: the notebook and the essay
    solved = with_answers(
        release,
        ans_add="def add(a, b):\n    return a + b",
        ans_mul="def mul(a, b):\n    return a * b",
        ans_root="def root(x):\n    return math.sqrt(x)",
    )
    nbformat.write(solved, folder / "alice" / "anything.ipynb")
    (folder / "alice" / "essay.md").write_text("# Essay\nmine\n", "utf-8")
    out = tmp_path / "grades.csv"
    assert cli_main(["grade", str(folder), "--release", str(course), "--csv", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = {row["student"]: row for row in csv.DictReader(out.open(encoding="utf-8"))}
    assert sorted(rows) == ["alice", "bob", "carol"]
    assert [rows["alice"][k] for k in ("total", "max", "add", "mul", "root", "essay")] == [
        "9",
        "9",
        "2",
        "3",
        "4",
        "present",
    ]
    assert (rows["bob"]["total"], rows["bob"]["tampered"]) == ("3", "grade-add")
    assert (rows["carol"]["total"], rows["carol"]["essay"]) == ("0", "missing")
    assert all(row["assignment"] == "hw9_demo" for row in rows.values())


def test_cli_refuses_bad_input_with_a_reason(course, tmp_path, capsys):
    assert cli_main(["grade", str(tmp_path / "nope.ipynb")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["grade", str(tmp_path)]) == 2
    assert "--csv" in capsys.readouterr().err
    other = new_notebook(cells=[new_code_cell("x = 1")])
    two = tmp_path / "two"
    for name in ("hw7_one", "hw8_two"):  # neither matches by metadata, name or cell ids
        (two / name).mkdir(parents=True)
        nbformat.write(new_notebook(cells=[new_code_cell("y = 2")]), two / name / f"{name}.ipynb")
    path = submit(tmp_path, other, "unrelated.ipynb")
    assert cli_main(["grade", str(path), "--release", str(two)]) == 1
    assert "cannot tell which assignment" in capsys.readouterr().err
