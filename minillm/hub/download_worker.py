"""Child process that downloads one model snapshot into a temporary folder.

Run as ``python -P download_worker.py '<json job>'`` by ``minillm.hub.download``. It lives in its
own process so that the parent can enforce a hard time limit (kill it) and clean up on Ctrl-C,
which no library call running in a thread allows. It imports nothing from minillm (importing
the package would load torch for nothing), and reports through a JSON result file.

Which files: the few minillm loads, never a whole repo (no *.bin, onnx/, original/ ...).
"""

from __future__ import annotations

import fnmatch
import json
import sys
import traceback
from pathlib import Path
from typing import Any

HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "README.md",
)
STARTED_MARKER = ".minillm-started"


def choose_files(repo_files: list[str], filename: str | None, name: str) -> list[str]:
    """The repo paths to download. ValueError explains why a repo cannot be used."""
    if filename is not None:
        if filename not in repo_files:
            ggufs = [f for f in repo_files if f.lower().endswith(".gguf")]
            raise ValueError(
                f"{name}: the repo has no file {filename!r}"
                + (f"; its GGUF files are: {', '.join(ggufs)}" if ggufs else "")
            )
        return [filename]
    top = [f for f in repo_files if "/" not in f]
    weights = fnmatch.filter(top, "*.safetensors")
    if "config.json" in top and weights:
        if "tokenizer.json" not in top:
            raise ValueError(
                f"{name} has config.json and safetensors but no tokenizer.json, the fast-tokenizer "
                "file minillm reads; pick a repo that ships one (or a GGUF repo)"
            )
        return [f for f in top if f in HF_FILES] + weights
    ggufs = [f for f in repo_files if f.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        example = next((g for g in ggufs if "q4_0" in g.lower()), ggufs[0])
        raise ValueError(
            f"{name} holds {len(ggufs)} GGUF files; pick one by appending its path to the name, "
            f"e.g. `minillm pull {name}/{example}`. Files: {', '.join(ggufs)}"
        )
    raise ValueError(
        f"{name} has neither config.json + *.safetensors + tokenizer.json nor a .gguf file, so "
        "minillm cannot load it"
    )


def _list_files(job: dict[str, Any]) -> list[str]:
    if job["source"] == "hf":
        from huggingface_hub import HfApi

        return list(HfApi(endpoint=job["endpoint"]).list_repo_files(job["repo_id"]))
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=job["endpoint"]) if job["endpoint"] else HubApi()
    return [str(f["Path"]) for f in api.get_model_files(job["repo_id"], recursive=True)]


def _download(job: dict[str, Any], files: list[str]) -> None:
    dest = Path(job["dest"])
    kwargs: dict[str, Any] = {"local_dir": str(dest), "allow_patterns": files}
    if job["endpoint"]:
        kwargs["endpoint"] = job["endpoint"]
    if job["source"] == "hf":
        from huggingface_hub import snapshot_download

        snapshot_download(job["repo_id"], cache_dir=str(dest / ".cache-hf"), **kwargs)
    else:
        from modelscope import snapshot_download

        snapshot_download(job["repo_id"], cache_dir=str(dest / ".cache-modelscope"), **kwargs)


def main(argv: list[str]) -> int:
    job = json.loads(argv[1])
    result_file = Path(job["result"])
    try:
        if job["source"] == "hf":
            import huggingface_hub  # noqa: F401 - imported before the marker: slow imports are not a stall
        else:
            import modelscope  # noqa: F401
        (Path(job["dest"]) / STARTED_MARKER).touch()
        files = choose_files(_list_files(job), job.get("filename"), job["name"])
        _download(job, files)
        result = {"ok": True, "files": files}
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent as text
        if job.get("debug"):
            traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
    result_file.write_text(json.dumps(result), encoding="utf-8")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
