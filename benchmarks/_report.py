"""Shared by the benchmark scripts: where a run happened, and writing its section of BENCHMARKS.md.

Each script owns one section of BENCHMARKS.md, delimited by ``<!-- begin:NAME -->`` and
``<!-- end:NAME -->``; rerunning a script replaces its own section and leaves the others alone.
Every section starts with the facts needed to judge its numbers: machine, threads, date,
minillm version and commit, backend and model.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
_TITLE = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/`; each section says how to reproduce it. Numbers\n"
    "from different machines or thread counts are not comparable: compare the ratios measured\n"
    "side by side within one section.\n"
)
_NAME = re.compile(r"^[a-z0-9_-]+$")


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else whatever platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip()


def git_commit(repo: Path = REPO) -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes."""
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_header(*, backend: str, model: str, threads: int, command: str) -> str:
    """The markdown lines that open a section: what ran, where, when."""
    import minillm

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"- command: `{command}`\n"
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, "
        f"torch threads used: {threads}\n"
        f"- date: {now}; minillm {minillm.__version__} (commit {git_commit()}); "
        f"Python {platform.python_version()}\n"
        f"- backend: `{backend}`; model: {model}\n"
    )


def write_section(name: str, markdown: str, path: str | Path = BENCHMARKS_MD) -> Path:
    """Put `markdown` between the begin/end markers of section `name` in `path`.

    The section is replaced if present and appended otherwise; the file is created with a
    title when missing. Returns the path written.
    """
    if not _NAME.match(name):
        raise ValueError(f"section name {name!r} must match {_NAME.pattern}")
    path = Path(path)
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else _TITLE
    if text.count(begin) != text.count(end) or text.count(begin) > 1:
        raise ValueError(f"{path} has unbalanced or repeated markers for section {name!r}")
    if begin in text:
        i, j = text.index(begin), text.index(end)
        if j < i:
            raise ValueError(f"{path}: the end marker of section {name!r} precedes its begin")
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured table; numbers are expected to be formatted by the caller."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row must have as many cells as the header")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
