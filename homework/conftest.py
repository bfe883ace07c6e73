"""Homework grading: `pytest homework/hw3_compression` runs the notebook and prints a grade.

How it works
- Notebooks under homework/ are collected by nbval in lax mode (outputs are not compared),
  in the kernel of the environment pytest runs in; this plugin switches that on, so no flags
  are needed. Every code cell becomes one test item, all run in one kernel, in order.
- A grader cell starts with a marker line `# GRADE: <part> (<n> points)`. The plugin gives that
  item a `points(n)` marker. A part marked `(<n> points, by hand)` (hw3's paper notes) is only
  checked for presence here and earns nothing: the instructor gives its points with a rubric. Ordinary pytest tests in homework/ may carry
  `@pytest.mark.points(n)` directly; their part name is the test's name.
- A part earns its points when its item passes. This grades the notebook as it is, graders
  included; the instructor grades with `minillm grade`, which restores the released graders. At the end a table of parts and the total,
  e.g. `hw3_compression: 14/20 points`, is printed per assignment folder.
- With MINILLM_GRADE_JSON=<path>, the results (every item, graded or not, with the name of the
  exception that failed it) are also written as JSON; the course's own tests use this to prove
  that sources earn full points and untouched student copies fail only with
  NotImplementedError.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from minillm.grading import markers

HOMEWORK_ROOT = Path(__file__).resolve().parent
GRADE_JSON_ENV = "MINILLM_GRADE_JSON"


@dataclass
class Result:
    """The outcome of one collected item of an assignment."""

    assignment: str
    nodeid: str
    part: str | None  # None for cells/tests that carry no points
    points: int
    outcome: str = "not run"  # passed | failed | skipped | not run
    error: str | None = None  # exception class name when failed, e.g. "NotImplementedError"
    by_hand: bool = False  # the instructor gives the points; passing only means "present"

    @property
    def earned(self) -> int:
        return self.points if self.outcome == "passed" and not self.by_hand else 0


def parse_grade_marker(source: str) -> tuple[str, int] | None:
    """Return (part, points) for a grader cell, None for other cells (raises if malformed)."""
    part = markers.parse_grade_marker(source)
    return None if part is None else (part.name, part.points)


def assignment_of(path: Path) -> str:
    """The assignment folder an item belongs to, relative to homework/ (e.g. 'hw3_compression')."""
    try:
        return path.resolve().parent.relative_to(HOMEWORK_ROOT).as_posix()
    except ValueError:
        return path.resolve().parent.name


def _kernel_error_name(item: pytest.Item) -> str | None:
    """The exception name the notebook kernel reported for an nbval cell, if any."""
    for output in getattr(item, "test_outputs", None) or []:
        if output.get("output_type") == "error":
            return output.get("ename")
    return None


class Gradebook:
    """Collects per-item outcomes and prints the grade at the end of the session."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        seen: dict[tuple[str, str], str] = {}
        for item in items:
            if HOMEWORK_ROOT not in item.path.resolve().parents:
                continue
            cell = getattr(item, "cell", None)
            part, points, by_hand = None, 0, False
            if cell is not None:
                try:
                    marker = markers.parse_grade_marker(cell.source)
                except ValueError as exc:
                    raise pytest.UsageError(f"{item.nodeid}: {exc}") from exc
                if marker is not None:
                    part, points, by_hand = marker.name, marker.points, marker.by_hand
                    item.add_marker(pytest.mark.points(points))
            else:
                mark = item.get_closest_marker("points")
                if mark is not None:
                    part, points = item.name, int(mark.args[0])
            assignment = assignment_of(item.path)
            if part is not None:
                key = (assignment, part)
                if key in seen:
                    raise pytest.UsageError(
                        f"{item.nodeid}: part {part!r} is graded twice in {assignment} "
                        f"(also {seen[key]})"
                    )
                seen[key] = item.nodeid
            self.results[item.nodeid] = Result(
                assignment, item.nodeid, part, points, by_hand=by_hand
            )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        result = self.results.get(item.nodeid)
        if result is None:
            return report
        if report.when == "call" or (report.when == "setup" and not report.passed):
            result.outcome = report.outcome
            if report.failed:
                result.error = _kernel_error_name(item) or (
                    call.excinfo.typename if call.excinfo else "unknown"
                )
        return report

    def pytest_terminal_summary(self, terminalreporter) -> None:
        by_assignment: dict[str, list[Result]] = defaultdict(list)
        for result in self.results.values():
            by_assignment[result.assignment].append(result)
        path = os.environ.get(GRADE_JSON_ENV)
        if path:
            data = {a: [asdict(r) for r in rs] for a, rs in by_assignment.items()}
            Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False), "utf-8")
        graded = {a: [r for r in rs if r.part] for a, rs in by_assignment.items()}
        if not any(graded.values()):
            return
        write = terminalreporter.write_line
        terminalreporter.section("homework grade")
        for assignment, parts in graded.items():
            if not parts:
                continue
            width = max(len(r.part) for r in parts)
            for r in parts:
                why = r.outcome if r.error is None else f"{r.outcome} ({r.error})"
                if r.by_hand:
                    state = "present" if r.outcome == "passed" else f"missing ({why})"
                    write(f"  {r.part:<{width}}    -/{r.points:<3} by hand, {state}")
                else:
                    write(f"  {r.part:<{width}}  {r.earned:>3}/{r.points:<3} {why}")
            earned = sum(r.earned for r in parts)
            total = sum(r.points for r in parts if not r.by_hand)
            write(f"{assignment}: {earned}/{total} points")
            hand = sum(r.points for r in parts if r.by_hand)
            if hand:
                write(f"  (+ up to {hand} points by hand: the instructor applies the rubric)")


def pytest_configure(config: pytest.Config) -> None:
    # Notebooks here are always graded by nbval in lax mode, in this environment's kernel.
    option = config.option
    if hasattr(option, "nbval_lax") and not (option.nbval or option.nbval_lax):
        option.nbval_lax = True
    if hasattr(option, "nbval_current_env") and not option.nbval_kernel_name:
        option.nbval_current_env = True
    if not config.pluginmanager.has_plugin("homework-gradebook"):
        config.pluginmanager.register(Gradebook(), "homework-gradebook")
