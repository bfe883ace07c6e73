"""Run an assembled notebook in a fresh kernel, one cell at a time, each under a time limit.

Errors do not stop the run (a failed part must not stop the next). A cell that runs past its
limit, or a kernel that dies (a crash, `os._exit`), costs only that cell: the kernel is thrown
away, a fresh one replays the non-grader cells that came before (their outputs discarded),
and the run goes on after the cell that hung. Grader cells are never replayed, because no
later cell may depend on one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from minillm.grading.markers import part_of

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "NO_PROXY": "127.0.0.1,localhost",
    "MPLBACKEND": "Agg",
}


@dataclass
class CellResult:
    """How one code cell ended: ok, error (with the exception), timeout or dead."""

    status: str
    error: str | None = None  # "NameError: name 'x' is not defined", or why it stopped

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _error_of(cell: Any) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"[:500]
    return None


def _client(nb: Any, workdir: Path, timeout_of: Callable[[Any], float]) -> NotebookClient:
    return NotebookClient(
        nb,
        timeout_func=lambda cell: int(max(1, round(timeout_of(cell)))),
        allow_errors=True,
        interrupt_on_timeout=False,
        kernel_name="python3",
        record_timing=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not the loopback TCP warning
        resources={"metadata": {"path": str(workdir)}},
    )


def kernel_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The grading kernel's environment: this one, offline, plus `extra`."""
    return {**os.environ, **OFFLINE_ENV, **(extra or {})}


def run_notebook(
    nb: Any,
    workdir: Path,
    timeout_of: Callable[[Any], float],
    env: dict[str, str] | None = None,
) -> dict[int, CellResult]:
    """Execute the code cells of `nb` in order (outputs stored in `nb`); results by index."""
    results: dict[int, CellResult] = {}
    env = kernel_env() if env is None else env
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    start = 0
    while start < len(code):
        client = _client(nb, workdir, timeout_of)
        with client.setup_kernel(env=env, cwd=str(workdir)):
            for index in code[:start]:  # replay what came before the cell that hung
                cell = nb.cells[index]
                if part_of(cell) is None and results[index].status in ("ok", "error"):
                    try:
                        client.execute_cell(copy.deepcopy(cell), index)
                    except (CellTimeoutError, DeadKernelError):
                        break  # the rest of the run still gets a kernel; this replay failed
            for position in range(start, len(code)):
                index = code[position]
                cell = nb.cells[index]
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    limit = timeout_of(cell)
                    results[index] = CellResult("timeout", f"stopped after {limit:g} s")
                except DeadKernelError:
                    results[index] = CellResult("dead", "the kernel died")
                else:
                    error = _error_of(cell)
                    results[index] = CellResult("error" if error else "ok", error)
                    continue
                start = position + 1
                break
            else:
                start = len(code)
    return results
