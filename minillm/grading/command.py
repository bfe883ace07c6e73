"""`minillm grade`: the subcommand's arguments and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minillm.grading.grade import DEFAULT_TIMEOUT_PER_PART, grade_folder, grade_notebook
from minillm.grading.release import ReleaseNotFound
from minillm.grading.report import write_csv


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grade",
        help="grade homework against the pristine release (one notebook, or a folder into CSV)",
        description=(
            "Grade a submitted notebook: answer cells come from the submission (by cell id), "
            "instructions and grader cells from the release, so an edited or deleted grader "
            "is restored and reported as tampered. Runs student code: grade in a container "
            "or a throwaway account."
        ),
    )
    p.add_argument("submission", type=Path, help="a notebook, or a folder of submissions")
    p.add_argument(
        "--release",
        type=Path,
        help="the released notebook or homework folder (default: homework/ of this checkout)",
    )
    p.add_argument("--json", action="store_true", help="print the grade as JSON")
    p.add_argument("--csv", type=Path, help="with a folder: write one row per submission here")
    p.add_argument(
        "--timeout-per-part",
        type=float,
        default=DEFAULT_TIMEOUT_PER_PART,
        metavar="S",
        help=f"seconds each answer and grader cell may run (default {DEFAULT_TIMEOUT_PER_PART:g})",
    )
    p.add_argument("--executed", type=Path, help="write the executed notebook here (one notebook)")
    p.set_defaults(func=cmd_grade)


def cmd_grade(args: argparse.Namespace) -> int:
    if args.timeout_per_part <= 0:
        print("error: --timeout-per-part must be positive", file=sys.stderr)
        return 2
    if not args.submission.exists():
        print(f"error: {args.submission} does not exist", file=sys.stderr)
        return 2
    try:
        if args.submission.is_dir():
            if args.csv is None:
                print("error: grading a folder needs --csv OUT.csv", file=sys.stderr)
                return 2
            graded = grade_folder(args.submission, args.release, args.timeout_per_part)
            write_csv(graded, args.csv)
            for student, report in graded:
                line = report if isinstance(report, str) else f"{report.total}/{report.max}"
                print(f"{student}: {line}")
            print(f"wrote {args.csv} ({len(graded)} submissions)")
            return 0
        report = grade_notebook(
            args.submission, args.release, args.timeout_per_part, executed=args.executed
        )
    except ReleaseNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json(), ensure_ascii=False) if args.json else report.table())
    return 0
