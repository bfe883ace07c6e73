"""The `minillm` command line: list / show / pull / rm output, exit codes, and `run`.

`main([...])` with capsys for most cases (fast); `python -m minillm.cli` in a subprocess for the
real entry point, offline failures and `run` (stdin must be a real pipe there).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillm.cli import main
from minillm.config import ModelConfig
from minillm.formats.gguf import read_header as read_gguf_header
from minillm.hub import show

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MINILLM_HOME", str(home))
    for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return home


def cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m minillm.cli ARGS` with this test's environment (MINILLM_HOME ...)."""
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ),
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- list / show / pull / rm
def test_list_shows_the_bundled_model_like_ollama(bundled_gguf_path):
    done = cli("list")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split() == ["NAME", "SOURCE", "SIZE", "MODIFIED"]
    (row,) = [r for r in rows if r.startswith("smollm2:135m")]
    mb = bundled_gguf_path.stat().st_size / 1e6
    assert row.split()[:4] == ["smollm2:135m", "bundled", f"{mb:.0f}", "MB"]
    assert row.rstrip().endswith("ago")


def test_show_prints_the_gguf_facts(capsys, bundled_gguf_path):
    code, out, _ = run_main(capsys, "show", "smollm2")
    assert code == 0
    md = read_gguf_header(bundled_gguf_path).metadata
    cfg = ModelConfig.from_gguf_metadata(md, has_output_tensor=False)
    rows = dict(re.findall(r"^    (\S.*?)\s{2,}(\S.*)$", out, re.MULTILINE))
    assert rows["architecture"] == "llama"
    assert rows["parameters"] == f"{cfg.num_params / 1e6:.1f}M"
    assert rows["parameter count"] == str(cfg.num_params)
    assert rows["quantization"] == "Q4_1"
    assert rows["context length"] == str(md["llama.context_length"])
    assert rows["embedding length"] == str(md["llama.embedding_length"])
    assert rows["layers"] == str(md["llama.block_count"])
    assert rows["kv heads"] == str(md["llama.attention.head_count_kv"])
    assert "  License" in out and md["general.license"] in out


def test_show_json_and_template(capsys, bundled_gguf_path):
    code, out, _ = run_main(capsys, "show", "smollm2", "--json")
    assert code == 0
    assert json.loads(out) == show("smollm2")
    code, out, _ = run_main(capsys, "show", "smollm2:135m", "--template")
    assert code == 0
    assert out == read_gguf_header(bundled_gguf_path).metadata["tokenizer.chat_template"] + "\n"


def test_pull_then_rm_bundled(capsys, home, bundled_gguf_path):
    code, out, err = run_main(capsys, "pull", "smollm2")
    assert code == 0, err
    assert out.strip().endswith("success") and "smollm2:135m" in out
    assert len(list((home / "manifests").glob("*.json"))) == 1
    code, out, _ = run_main(capsys, "rm", "smollm2")
    assert code == 0 and "unregistered 'smollm2:135m'" in out
    assert not list((home / "manifests").glob("*.json"))
    assert bundled_gguf_path.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "no-such-model"], "Error: model 'no-such-model' not found"),
        (["rm", "hf:nobody/nothing"], "Error: model 'hf:nobody/nothing' is not in the registry"),
        (["run", "no-such-model", "hi"], "Error: model 'no-such-model' not found"),
        (["pull", "hf:bad"], "Error: malformed model name 'hf:bad'"),
        (["pull", "smollm2", "--timeout", "0"], "Error: timeout must be > 0"),
    ],
)
def test_errors_are_one_line_and_exit_1(capsys, args, message):
    code, _, err = run_main(capsys, *args)
    assert code == 1
    assert err.startswith(message)
    assert "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run_main(capsys, "show")
    assert code == 2 and "usage:" in err


def test_unreadable_files_are_one_error_line(capsys, tmp_path):
    """An OSError (here a folder given as the Modelfile) is the user's input, not a bug."""
    code, _, err = run_main(capsys, "create", "mario", "-f", str(tmp_path))
    assert code == 1
    assert err == f"Error: [Errno 21] Is a directory: '{tmp_path}'\n"


def test_offline_pull_from_the_command_line(home, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")  # a closed port: refused at once
    start = time.monotonic()
    done = cli("pull", "modelscope:Qwen/Qwen2.5-0.5B-Instruct", timeout=60)
    seconds = time.monotonic() - start
    assert done.returncode == 1
    assert seconds < 30
    assert done.stderr.splitlines()[-1].startswith("Error: cannot reach ModelScope")
    assert "modelscope:Qwen/Qwen2.5-0.5B-Instruct" in done.stderr
    assert "connection refused" in done.stderr and "Traceback" not in done.stderr
    assert not (home / "models").exists() or not any((home / "models").iterdir())


# ---------------------------------------------------------------- run (needs minillm.LLM)
TIMING_LABELS = (
    "total duration",
    "load duration",
    "prompt eval count",
    "prompt eval duration",
    "prompt eval rate",
    "eval count",
    "eval duration",
    "eval rate",
)


def timings(text: str) -> dict[str, float]:
    """The numbers of the timing block: label -> value (durations in seconds)."""
    found = {}
    for label in TIMING_LABELS:
        m = re.search(rf"^{label}:\s+([0-9.]+)\s*(ms|s|token\(s\)|tokens/s)$", text, re.MULTILINE)
        assert m, f"no '{label}' line in:\n{text}"
        value = float(m[1])
        found[label] = value / 1000 if m[2] == "ms" else value
    return found


def test_timing_lines_follow_the_metrics():
    from minillm.cli import timing_lines
    from minillm.engine.outputs import RequestMetrics

    m = RequestMetrics(
        arrival_time=10.0,
        first_token_time=10.5,
        finished_time=12.5,
        num_prompt_tokens=20,
        num_generation_tokens=9,
    )
    t = timings("\n".join(timing_lines(m, load_seconds=1.25, total_seconds=4.0)))
    assert t["total duration"] == 4.0 and t["load duration"] == 1.25
    assert t["prompt eval count"] == 20 and t["prompt eval duration"] == 0.5
    assert t["prompt eval rate"] == 40.0  # 20 tokens / 0.5 s
    assert t["eval count"] == 9 and t["eval duration"] == 2.0
    assert t["eval rate"] == 4.0  # the 8 tokens after the first / 2 s


class FakeChat:
    """Stands in for the model in tests of the CLI's own logic (modes, history, commands):
    it records the conversation it is asked to continue and answers with a numbered reply."""

    calls: list[list[dict[str, str]]] = []

    def __init__(self, args, out) -> None:
        self.out, self.load_seconds = out, 0.5
        FakeChat.calls = []

    def answer(self, messages, load_seconds):
        FakeChat.calls.append([dict(m) for m in messages])
        reply = f"reply {len(FakeChat.calls)}"
        self.out.write(reply + "\n\n")
        return reply


@pytest.fixture
def fake_chat(monkeypatch):
    import minillm.cli

    monkeypatch.setattr(minillm.cli, "Chat", FakeChat)
    return FakeChat


def test_piped_stdin_is_the_prompt(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr("sys.stdin", io.StringIO("Summarise this:\nKV caches store keys.\n"))
    code, out, _ = run_main(capsys, "run", "smollm2", "--system", "Be brief.")
    assert code == 0 and out.startswith("reply 1")
    assert fake_chat.calls == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Summarise this:\nKV caches store keys.\n"},
        ]
    ]


def test_prompt_words_are_joined_and_options_may_follow(capsys, fake_chat):
    code, _, _ = run_main(
        capsys, "run", "smollm2", "why", "is", "the", "sky", "blue", "--seed", "1"
    )
    assert code == 0
    assert fake_chat.calls == [[{"role": "user", "content": "why is the sky blue"}]]


def test_empty_stdin_is_an_error(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run_main(capsys, "run", "smollm2")
    assert code == 1 and err.startswith("Error: no prompt")


def test_repl_keeps_history_and_obeys_commands(capsys, monkeypatch, fake_chat):
    lines = "hi\n\nagain\n/clear\nfresh\n/nope\n/bye\nnot read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, _ = run_main(capsys, "run", "smollm2", "-i", "--system", "S")
    assert code == 0
    sys_msg = {"role": "system", "content": "S"}
    assert fake_chat.calls == [
        [sys_msg, {"role": "user", "content": "hi"}],
        [
            sys_msg,
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "reply 1"},
            {"role": "user", "content": "again"},
        ],
        [sys_msg, {"role": "user", "content": "fresh"}],  # after /clear
    ]
    assert "Cleared session context" in out and "Unknown command '/nope'" in out
    assert out.count(">>> ") == 7  # one prompt per line read, up to and including /bye


def test_repl_ends_at_eof(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    code, _, _ = run_main(capsys, "run", "smollm2", "-i")
    assert code == 0 and len(fake_chat.calls) == 1


def test_run_rejects_bad_sampling_flags(capsys):
    code, _, err = run_main(capsys, "run", "smollm2", "hi", "--temperature", "-1")
    assert code == 1 and err.startswith("Error: ") and "temperature" in err


# ---------------------------------------------------------------- run, for real (bundled model)
def test_run_one_prompt_streams_then_prints_timings():
    done = cli(
        "run",
        "smollm2",
        "What is a KV cache?",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    answer, _, stats = done.stdout.partition("\n\n")
    assert answer.strip()
    t = timings(stats)
    assert all(v > 0 for v in t.values()), t
    assert t["eval count"] <= 16
    assert t["total duration"] >= t["load duration"] + t["prompt eval duration"]


def test_run_repl_through_stdin():
    done = cli(
        "run",
        "smollm2",
        "-i",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        stdin="hello\n/bye\n",
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(">>> ")
    reply = out.removeprefix(">>> ").partition("\n\n")[0]
    assert reply.strip()
    assert all(v > 0 for v in timings(out).values())
    assert out.rstrip().endswith(">>>")  # the prompt that read /bye, then a clean exit
