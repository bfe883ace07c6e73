"""`minillm grade`: homework graded against the pristine release, each part on its own.

markers.py   how grader and answer cells are marked (source markers -> release metadata)
release.py   finding the released notebook a submission belongs to
assemble.py  the release's cells with the student's answers (tampered cells restored)
execute.py   a fresh kernel per run, a time limit per cell, recovery from hangs and crashes
report.py    the grade as JSON, a table and CSV rows
grade.py     one submission, or a folder of them
command.py   the CLI subcommand
"""

from minillm.grading.grade import grade_folder, grade_notebook
from minillm.grading.report import Report

__all__ = ["Report", "grade_folder", "grade_notebook"]
