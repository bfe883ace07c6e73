"""The homework machinery: student copies, release, and the grading proofs (instructor-only).

The proofs, per assignment in homework/source/:
(a) the instructor source earns full points;
(b) every graded part of the untouched student copy fails, and only with NotImplementedError
    (so no grader passes without the student's code, and none fails for an unrelated reason);
(c) the student copies are exactly what scripts/make_student_copies.py generates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO = Path(__file__).resolve().parent.parent
HOMEWORK = REPO / "homework"
ASSIGNMENTS = sorted(p.name for p in (HOMEWORK / "source").iterdir() if p.is_dir())
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


copies = _load_module(REPO / "scripts" / "make_student_copies.py", "make_student_copies")
release = _load_module(REPO / "scripts" / "release.py", "release")


# ---- solution stripping -------------------------------------------------------------------


def test_code_region_becomes_raise_at_the_begin_indentation():
    source = f"def f(x):\n    {BEGIN}\n    return x + 1\n    {END}\n\nprint(1)\n"
    out = copies.strip_solutions(source, copies.CODE_STUB)
    assert out == f"def f(x):\n    {copies.CODE_STUB}\n\nprint(1)\n"
    namespace: dict = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


def test_text_without_final_newline_keeps_its_shape():
    assert copies.strip_solutions(f"a\n{BEGIN}\nb\n{END}", "S") == "a\nS"
    assert copies.strip_solutions("no regions", "S") == "no regions"


@pytest.mark.parametrize(
    "text, problem",
    [
        (f"{BEGIN}\n{BEGIN}\n{END}\n", "nested"),
        (f"x\n{END}\n", "without"),
        (f"{BEGIN}\nx\n", "never closed"),
    ],
)
def test_unbalanced_regions_are_rejected(text, problem):
    with pytest.raises(ValueError, match=problem):
        copies.strip_solutions(text, "S", "f.py")


def _source_notebook() -> str:
    code = new_code_cell(f"def g():\n    {BEGIN}\n    return 42\n    {END}", execution_count=3)
    code.outputs = [new_output("stream", name="stdout", text="42\n")]
    code.metadata["execution"] = {"iopub.status.idle": "2024-01-01T00:00:00"}
    prose = new_markdown_cell(f"## Notes\n<!-- {BEGIN} -->\nmy answer\n<!-- {END} -->")
    nb = new_notebook(cells=[code, prose])
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i}"
    return nbformat.writes(nb)


def test_student_notebook_is_stubbed_and_cleared():
    nb = nbformat.reads(copies.student_notebook(_source_notebook()), as_version=4)
    code, prose = nb.cells
    assert code.source == f"def g():\n    {copies.CODE_STUB}"
    assert code.outputs == [] and code.execution_count is None
    assert "execution" not in code.metadata
    assert prose.source == f"## Notes\n{copies.TEXT_STUB}"
    assert "my answer" not in nbformat.writes(nb) and "42" not in code.source


def _fake_homework(root: Path) -> Path:
    source = root / "homework" / "source" / "hw9_demo"
    source.mkdir(parents=True)
    (source / "demo.ipynb").write_text(_source_notebook(), "utf-8")
    (source / "helper.py").write_text(f"def h():\n    {BEGIN}\n    return 1\n    {END}\n")
    (source / "data.bin").write_bytes(bytes(range(256)))
    return root / "homework"


def test_check_finds_stale_missing_and_extra_files(tmp_path):
    homework = _fake_homework(tmp_path)
    expected = copies.expected_copies(homework)
    assert sorted(map(str, expected)) == [
        "hw9_demo/data.bin",
        "hw9_demo/demo.ipynb",
        "hw9_demo/helper.py",
    ]
    assert len(copies.find_problems(homework, expected)) == 3  # all missing
    assert copies.main(["--homework", str(homework)], print_=lambda _: None) == 0
    assert copies.main(["--check", "--homework", str(homework)], print_=lambda _: None) == 0
    assert (homework / "hw9_demo" / "data.bin").read_bytes() == bytes(range(256))

    (homework / "hw9_demo" / "helper.py").write_text("def h():\n    return 1\n")
    (homework / "hw9_demo" / "stray.py").write_text("x = 1\n")
    (homework / "hw9_demo" / "demo.ipynb").unlink()
    lines: list[str] = []
    assert copies.main(["--check", "--homework", str(homework)], print_=lines.append) == 1
    report = "\n".join(lines)
    assert "out of date: homework/hw9_demo/helper.py" in report
    assert "missing: homework/hw9_demo/demo.ipynb" in report
    assert "not generated from a source: hw9_demo/stray.py" in report


def test_student_copies_are_in_sync():
    """Proof (c)."""
    lines: list[str] = []
    status = copies.main(["--check"], print_=lines.append)
    assert status == 0, "\n".join(lines)


# ---- release ------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _fake_repo(root: Path) -> Path:
    homework = _fake_homework(root)
    copies.write_copies(homework, copies.expected_copies(homework))
    (root / "README.md").write_text("course\n")
    (root / "scripts").mkdir()
    (root / "scripts" / "release.py").write_text(f"# mentions {BEGIN}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    return root


def test_release_drops_instructor_files(tmp_path):
    repo = _fake_repo(tmp_path / "repo")
    written = release.release(tmp_path / "out", repo)
    assert "README.md" in written and "homework/hw9_demo/demo.ipynb" in written
    assert not any(name.startswith("homework/source/") for name in written)
    assert "scripts/release.py" not in written
    assert not (tmp_path / "out" / "homework" / "source").exists()


def test_release_refuses_leaks_stale_copies_and_a_used_folder(tmp_path):
    repo = _fake_repo(tmp_path / "repo")
    (repo / "notes.md").write_text(f"<!-- {BEGIN} -->\nanswer\n<!-- {END} -->\n")
    _git(repo, "add", "notes.md")
    with pytest.raises(RuntimeError, match="notes.md"):
        release.release(tmp_path / "out1", repo)

    (repo / "notes.md").unlink()
    (repo / "homework" / "hw9_demo" / "helper.py").write_text("def h():\n    return 1\n")
    with pytest.raises(RuntimeError, match="out of date"):
        release.release(tmp_path / "out2", repo)

    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        release.release(tmp_path / "out3", repo)


def test_release_of_this_repository_has_no_solutions(tmp_path):
    written = release.release(tmp_path / "mirror", REPO)
    assert written, "nothing tracked by git was released"
    assert not any(name.startswith("homework/source/") for name in written)
    assert release.leaked_solutions(tmp_path / "mirror") == []


# ---- grading proofs -------------------------------------------------------------------------


def _grade(folder: Path, tmp_path: Path) -> tuple[list[dict], str]:
    """Run the student's grading command on `folder`; return the per-item results and output."""
    report = tmp_path / "grade.json"
    env = {**os.environ, "MINILLM_GRADE_JSON": str(report)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(folder), "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), f"pytest could not grade {folder}:\n{output[-4000:]}"
    results = [r for items in json.loads(report.read_text("utf-8")).values() for r in items]
    assert results, f"no items collected in {folder}"
    return results, output


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_source_earns_full_points(assignment, tmp_path):
    """Proof (a)."""
    results, output = _grade(HOMEWORK / "source" / assignment, tmp_path)
    graded = [r for r in results if r["part"]]
    assert graded, f"{assignment} has no graded parts"
    failed = [
        f"{r['nodeid']}: {r['outcome']} {r['error']}" for r in results if r["outcome"] != "passed"
    ]
    assert not failed, "\n".join(failed) + "\n" + output[-4000:]
    total = sum(r["points"] for r in graded if not r["by_hand"])
    assert f"{assignment}: {total}/{total} points" in output


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_untouched_copy_fails_only_with_not_implemented(assignment, tmp_path):
    """Proof (b)."""
    results, output = _grade(HOMEWORK / assignment, tmp_path)
    source_parts = _parts(HOMEWORK / "source" / assignment)
    graded = [r for r in results if r["part"]]
    assert sorted(r["part"] for r in graded) == source_parts, "graded parts differ from the source"
    wrong = [
        f"{r['nodeid']} ({r['part'] or 'ungraded'}): {r['outcome']} {r['error']}"
        for r in results
        if (r["part"] and r["outcome"] != "failed")
        or (r["outcome"] == "failed" and r["error"] != "NotImplementedError")
        or r["outcome"] not in ("passed", "failed")
    ]
    assert not wrong, "\n".join(wrong) + "\n" + output[-4000:]
    total = sum(r["points"] for r in graded if not r["by_hand"])
    assert f"{assignment}: 0/{total} points" in output


def _parts(folder: Path) -> list[str]:
    """Graded parts declared in a folder's notebooks (read statically, nothing executed)."""
    parse = _load_module(HOMEWORK / "conftest.py", "homework_conftest").parse_grade_marker
    parts = []
    for path in sorted(folder.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            marker = parse(cell.source) if cell.cell_type == "code" else None
            if marker:
                parts.append(marker[0])
    return sorted(parts)
