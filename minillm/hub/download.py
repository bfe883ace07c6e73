"""Download a ModelScope / HF hub snapshot safely: check, fetch in a child, rename into place.

1. refuse at once when offline mode is set, and fail fast when the endpoint is unreachable;
2. run ``download_worker.py`` in a child process writing into ``models/.tmp-<slug>-<pid>-*``;
   kill it when nothing has been written for ``timeout`` seconds (a stalled network);
3. only a complete download is renamed to ``models/<slug>``. On any failure or Ctrl-C the
   temporary folder is deleted, so no half-written model is ever left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from minillm.hub.download_worker import STARTED_MARKER
from minillm.hub.errors import HubError
from minillm.hub.names import RemoteName
from minillm.hub.network import check_reachable, offline_reason, source_endpoint
from minillm.hub.ref import ModelRef, ref_for_path
from minillm.hub.registry import download_dir, models_dir, slug

WORKER = Path(__file__).with_name("download_worker.py")
SOURCE_LABELS = {"modelscope": "ModelScope", "hf": "the Hugging Face hub"}
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class _Job:
    remote: RemoteName
    endpoint: str | None  # None: let the library pick its default
    endpoint_text: str  # for messages


def _progress_signature(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``: it changes whenever the download makes progress."""
    files = size = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                files += 1
                size += p.stat().st_size
        except OSError:  # a file renamed away between listing and stat
            continue
    return files, size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_stale_temp_dirs() -> None:
    """Delete folders left by a pull or rm that was killed (its process is gone):
    ``.tmp-<slug>-<pid>-<hex>``, ``.old-<slug>-<pid>``, ``.trash-<slug>-<pid>``."""
    for leftover in models_dir().glob(".*-*"):
        parts = leftover.name.split("-")
        pid_text = parts[-2] if leftover.name.startswith(".tmp-") else parts[-1]
        if not leftover.name.startswith((".tmp-", ".old-", ".trash-")) or not pid_text.isdigit():
            continue
        if int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(leftover, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_worker(job: _Job, tmp: Path, timeout: float, quiet: bool) -> list[str]:
    name, source = job.remote.canonical, job.remote.source
    result_file = tmp / ".minillm-result.json"
    payload = {
        "name": name,
        "source": source,
        "repo_id": job.remote.repo_id,
        "filename": job.remote.filename,
        "endpoint": job.endpoint,
        "dest": str(tmp),
        "result": str(result_file),
        "debug": bool(os.environ.get("MINILLM_DEBUG")),
    }
    sink = subprocess.DEVNULL if quiet else None
    # -P: do not put minillm/hub/ on sys.path (its module names must not shadow libraries)
    cmd = [sys.executable, "-P", str(WORKER), json.dumps(payload)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        last, last_change = _progress_signature(tmp), time.monotonic()
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            now, sig = time.monotonic(), _progress_signature(tmp)
            if sig != last:
                last, last_change = sig, now
            elif now - last_change > timeout:
                _stop(proc)
                stage = "downloading" if (tmp / STARTED_MARKER).exists() else "starting"
                raise HubError(
                    f"pulling {name} from {SOURCE_LABELS[source]} ({job.endpoint_text}) made no "
                    f"progress for {timeout:g} s while {stage}; stopped it. The network is slow or "
                    "blocked: check your connection or proxy, or retry with a longer --timeout"
                )
    finally:
        _stop(proc)
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise HubError(
            f"pulling {name} from {SOURCE_LABELS[source]} failed: the download process exited "
            f"with code {proc.returncode} without a result"
        ) from None
    if not result["ok"]:
        error = result["error"].removeprefix("ValueError: ")
        raise HubError(
            f"pulling {name} from {SOURCE_LABELS[source]} ({job.endpoint_text}) failed: {error}"
        )
    return list(result["files"])


def _finish(tmp: Path, files: list[str], name: str, source: str) -> ModelRef:
    """Drop library caches, check the files, then move the folder into place atomically."""
    for entry in tmp.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith("."):
            entry.unlink()
    missing = [f for f in files if not (tmp / f).is_file()]
    if missing:
        raise HubError(f"pulling {name}: the download finished without {', '.join(missing)}")
    final = download_dir(name)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    target = final / ggufs[0] if ggufs else final
    try:
        return ref_for_path(target, name=name, source=source)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as e:
        shutil.rmtree(final, ignore_errors=True)
        raise HubError(f"pulling {name}: the downloaded files are not a usable model: {e}") from e


def download_snapshot(remote: RemoteName, *, timeout: float = 30, quiet: bool = False) -> ModelRef:
    """Fetch ``remote`` into the registry's models folder and return where it landed."""
    name, source = remote.canonical, remote.source
    label = SOURCE_LABELS[source]
    reason = offline_reason(source)
    if reason:
        raise HubError(f"cannot pull {name} from {label}: {reason}; unset it to download")
    endpoint = source_endpoint(source)
    endpoint_text = endpoint.url + (f" from {endpoint.origin}" if endpoint.from_env else "")
    problem = check_reachable(endpoint.url, timeout=min(timeout, 10.0))
    if problem:
        hint = {
            "modelscope": "set MODELSCOPE_DOMAIN to a reachable mirror",
            "hf": "set HF_ENDPOINT to a reachable mirror, or pull modelscope:ORG/NAME instead",
        }[source]
        raise HubError(
            f"cannot reach {label} ({endpoint_text}) for {name}: {problem}. "
            f"Check your network or proxy, or {hint}"
        )
    models_dir().mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_dirs()
    tmp = models_dir() / f".tmp-{slug(name)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    job = _Job(remote, endpoint.url if endpoint.from_env else None, endpoint_text)
    try:
        files = _run_worker(job, tmp, timeout, quiet)
        return _finish(tmp, files, name, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
