"""A submission's grade, as JSON for tools, a table for people and CSV rows for a class."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PartResult:
    """One graded part: points earned out of `max`, and why when not all."""

    name: str
    points: int
    max: int
    status: str  # ok | error | timeout | dead | not run
    error: str | None = None


@dataclass
class HandPart:
    """A part a person grades (e.g. hw3's paper notes): the auto-grader only checks presence."""

    name: str
    max: int
    present: bool
    error: str | None = None


@dataclass
class Report:
    """Everything `minillm grade` says about one submission."""

    submission: str
    assignment: str
    parts: list[PartResult]
    by_hand: list[HandPart] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)
    missing_answers: list[str] = field(default_factory=list)
    ignored_cells: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(p.points for p in self.parts)

    @property
    def max(self) -> int:
        return sum(p.max for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"total": self.total, "max": self.max, **data}

    def table(self) -> str:
        width = max([len(p.name) for p in [*self.parts, *self.by_hand]] + [4])
        lines = [f"{self.assignment} ({self.submission})"]
        for p in self.parts:
            why = p.status if p.error is None else f"{p.status}: {p.error.splitlines()[0]}"
            lines.append(f"  {p.name:<{width}}  {p.points:>3}/{p.max:<3} {why}")
        for h in self.by_hand:
            state = "present" if h.present else f"missing ({h.error})"
            lines.append(f"  {h.name:<{width}}    -/{h.max:<3} by hand; {state}")
        lines.append(f"total: {self.total}/{self.max} points")
        if self.by_hand:
            hand = sum(h.max for h in self.by_hand)
            lines.append(f"  (+ up to {hand} points by hand: the instructor applies the rubric)")
        if self.tampered:
            lines.append("tampered (restored from the release): " + ", ".join(self.tampered))
        if self.missing_answers:
            lines.append("answer cells not found: " + ", ".join(self.missing_answers))
        if self.ignored_cells:
            lines.append("cells added by the student (not run): " + ", ".join(self.ignored_cells))
        return "\n".join(lines)


def write_csv(reports: list[tuple[str, Report | str]], path: Path) -> None:
    """One row per student: total, max, each part, the tampered cells, or the error."""
    parts: list[str] = []
    for _, report in reports:
        if isinstance(report, Report):
            parts += [p.name for p in report.parts if p.name not in parts]
            parts += [h.name for h in report.by_hand if h.name not in parts]
    header = ["student", "assignment", "total", "max", *parts, "tampered", "error"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for student, report in reports:
            if not isinstance(report, Report):
                writer.writerow([student, "", "", "", *[""] * len(parts), "", report])
                continue
            cells = {p.name: p.points for p in report.parts}
            cells |= {h.name: "present" if h.present else "missing" for h in report.by_hand}
            row = [student, report.assignment, report.total, report.max]
            row += [cells.get(name, "") for name in parts]
            writer.writerow([*row, ";".join(report.tampered), ""])
