"""Build the student release of the course: the repository without solutions.

    python scripts/release.py OUTDIR

Copies every file tracked by git (as it is in the working tree) into OUTDIR, except the
instructor-only ones: homework/source/ (the solutions) and the tools and tests that need it.
Refuses to run when the student copies are out of date, and fails if any solution marker
survives anywhere in the result.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_lesson_copies  # noqa: E402
import make_student_copies  # noqa: E402

REPO_ROOT = make_student_copies.REPO_ROOT
INSTRUCTOR_ONLY_DIRS = ("homework/source/", "lessons/source/", "instructors/answers/")
INSTRUCTOR_ONLY_FILES = {
    "scripts/make_lesson_copies.py",
    "scripts/make_student_copies.py",
    "scripts/release.py",
    "tests/test_homework_machinery.py",
    "tests/test_grading.py",  # builds a demo release with make_student_copies.py
    "tests/test_grading_homework.py",  # grades the sources; its mutants quote the solutions
    "tests/test_lesson_exercises.py",
}
MARKERS = (make_student_copies.BEGIN.encode(), make_student_copies.END.encode())


def tracked_files(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout
    return sorted(name for name in out.decode("utf-8").split("\0") if name)


def is_released(name: str) -> bool:
    return name not in INSTRUCTOR_ONLY_FILES and not name.startswith(INSTRUCTOR_ONLY_DIRS)


def leaked_solutions(root: Path) -> list[Path]:
    """Files under `root` that still contain a solution marker."""
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and any(m in p.read_bytes() for m in MARKERS)
    )


def release(outdir: Path, repo: Path = REPO_ROOT) -> list[str]:
    """Write the student mirror into `outdir` (new or empty); return the files written."""
    if outdir.exists() and any(outdir.iterdir()):
        raise ValueError(f"{outdir} is not empty; give a new or empty folder")
    homework = repo / "homework"
    problems = make_student_copies.find_problems(
        homework, make_student_copies.expected_copies(homework)
    )
    lessons = repo / "lessons"
    problems += make_lesson_copies.find_problems(
        lessons, make_lesson_copies.expected_lessons(lessons)
    )
    if problems:
        raise RuntimeError(
            "student copies are out of date (run scripts/make_student_copies.py):\n"
            + "\n".join(problems)
        )
    written = []
    for name in tracked_files(repo):
        source = repo / name
        if not is_released(name) or not source.is_file():
            continue  # instructor-only, or deleted in the working tree
        target = outdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        written.append(name)
    leaks = leaked_solutions(outdir)
    if leaks:
        raise RuntimeError("solution markers survive in the release: " + ", ".join(map(str, leaks)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    try:
        written = release(args.outdir)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"released {len(written)} files into {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
