"""Corrupt GGUF files: one clear error naming the file and the field, fast, never a traceback.

Every corrupt file starts from one valid tiny model (random weights from `transformers`, written
by minillm's writer through gguf's GGUFWriter) and changes one thing: a byte patch at a place
found by searching for the length-prefixed key or tensor name (the GGUF layout is in
formats/gguf.py), or a rewrite with one metadata value replaced. The valid file itself must load,
show and read in gguf's own GGUFReader, so every failure below is the corruption's doing.

Python callers get a ValueError (GGUFError) whose message names the file and the field; the
command line prints one `Error:` line and exits 1 for `show`, `run`, `serve` and `create`.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType

from minillm.cli import main
from minillm.formats.gguf import GGUFError, GGUFFile, read_header
from minillm.formats.gguf_check import check_gguf_model
from minillm.formats.gguf_write import (
    TypedValue,
    metadata_for_hf_model,
    read_typed_metadata,
    save_model_gguf,
    write_gguf,
)
from minillm.loader import read_model_files
from minillm.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
U32, STRING, ARRAY = GGUFValueType.UINT32, GGUFValueType.STRING, GGUFValueType.ARRAY


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A private registry, so `create` never touches the user's."""
    monkeypatch.setenv("MINILLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid tiny llama GGUF (2 layers, hidden 64, 4 heads / 2 KV heads, F32) that states
    its alignment, so that the alignment can be corrupted in place."""
    folder = make_tiny_model(tmp_path_factory.mktemp("corrupt") / "hf", "llama", seed=3)
    config, weights, tokenizer = read_model_files(folder)
    return save_model_gguf(
        folder / "tiny.gguf",
        config,
        weights,
        metadata_for_hf_model(config, tokenizer),
        "F32",
        extra_metadata={"general.alignment": TypedValue(32, U32)},
    )


# ---------------------------------------------------------------- how to corrupt a file
def _find_once(data: bytes, text: str) -> int:
    """Offset just past the length-prefixed string `text` (a key or a tensor name)."""
    raw = text.encode()
    needle = struct.pack("<Q", len(raw)) + raw
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) < 0, f"{text!r} is not in the header once"
    return at + len(needle)


def _put(data: bytes, pos: int, fmt: str, value: object) -> bytes:
    raw = struct.pack(fmt, value)
    return data[:pos] + raw + data[pos + len(raw) :]


def set_value(key: str, fmt: str, value: object) -> Callable[[Path], bytes]:
    """The value of metadata `key` (a scalar whose type has struct format `fmt`) set to `value`."""

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        return _put(data, _find_once(data, key) + 4, fmt, value)

    return corrupt


def at_key(key: str, delta: int, fmt: str, value: object) -> Callable[[Path], bytes]:
    """`fmt` = `value` written `delta` bytes after metadata `key` (0: its value type)."""

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        return _put(data, _find_once(data, key) + delta, fmt, value)

    return corrupt


def rename(old: str, new: str) -> Callable[[Path], bytes]:
    """A key or tensor name replaced by another of the same length (so nothing moves)."""
    assert len(old) == len(new)

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        end = _find_once(data, old)
        return data[: end - len(old)] + new.encode("latin-1") + data[end:]

    return corrupt


def _entry(data: bytes, name: str) -> dict[str, tuple[int, str]]:
    """Where each field of tensor `name`'s directory entry is: field -> (offset, format)."""
    pos = _find_once(data, name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    fields = {"n_dims": (pos, "<I"), "type": (pos + 4 + 8 * n_dims, "<I")}
    fields["offset"] = (pos + 8 + 8 * n_dims, "<Q")
    return fields | {f"dim{i}": (pos + 4 + 8 * i, "<Q") for i in range(n_dims)}


def tensor_field(name: str, field: str, value: int) -> Callable[[Path], bytes]:
    """One field of tensor `name`'s directory entry: n_dims, dim0 (the row), dim1, type, offset."""

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        return _put(data, *_entry(data, name)[field], value)

    return corrupt


def same_offset(name: str, as_name: str) -> Callable[[Path], bytes]:
    """Tensor `name` pointed at the data of tensor `as_name`: the two overlap."""

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        pos, fmt = _entry(data, as_name)["offset"]
        return _put(data, *_entry(data, name)["offset"], struct.unpack_from(fmt, data, pos)[0])

    return corrupt


def chain(*corruptions: Callable[[Path], bytes]) -> Callable[[Path], bytes]:
    """Several corruptions, one after the other."""

    def corrupt(base: Path) -> bytes:
        step = base
        for corruption in corruptions:
            data = corruption(step)
            step = base.with_name("chain-step.gguf")
            step.write_bytes(data)
        return data

    return corrupt


def header_field(offset: int, value: int) -> Callable[[Path], bytes]:
    return lambda base: _put(base.read_bytes(), offset, "<Q" if offset >= 8 else "<I", value)


def cut(keep: int) -> Callable[[Path], bytes]:
    """The first `keep` bytes (negative: all but the last -keep)."""
    return lambda base: base.read_bytes()[:keep]


def cut_after(key: str, extra: int) -> Callable[[Path], bytes]:
    """The file cut `extra` bytes after metadata `key` (inside its value type u32 for 2)."""

    def corrupt(base: Path) -> bytes:
        data = base.read_bytes()
        return data[: _find_once(data, key) + extra]

    return corrupt


def rewrite(key: str, value: TypedValue | None) -> Callable[[Path], bytes]:
    """The file written again by minillm's writer with metadata `key` replaced (None: dropped)."""

    def corrupt(base: Path) -> bytes:
        metadata = read_typed_metadata(base)
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
        out = write_gguf(
            base.with_name("rewritten.gguf"), "llama", GGUFFile(base).tensors, metadata
        )
        return out.read_bytes()

    return corrupt


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def bare_file(n_tensors: int, n_kv: int, extra: bytes = b"") -> Callable[[Path], bytes]:
    """A whole file: the header counts, general.architecture, then `extra` (more keys)."""
    arch = _string("general.architecture") + struct.pack("<I", 8) + _string("llama")
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    return lambda _: head + arch + extra


def merges_of(make: Callable[[list[str]], list[str]]) -> Callable[[Path], bytes]:
    """tokenizer.ggml.merges replaced by `make(tokens)`."""

    def corrupt(base: Path) -> bytes:
        merges = make(read_header(base).metadata["tokenizer.ggml.tokens"])
        return rewrite("tokenizer.ggml.merges", TypedValue(merges, ARRAY, STRING))(base)

    return corrupt


def nested_arrays(depth: int) -> Callable[[Path], bytes]:
    """A file whose one extra key is an array of an array of ... `depth` deep."""
    nest = struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    return bare_file(0, 2, _string("deep") + struct.pack("<I", 9) + nest)


# (case id, corruption, what the message must say after the file's path)
Case = tuple[str, Callable[[Path], bytes], str]
CASES: list[Case] = [
    # --- metadata values the probes found
    ("alignment 0", set_value("general.alignment", "<I", 0),
     "metadata 'general.alignment': must be a positive power of two, got 0"),
    ("alignment 48", set_value("general.alignment", "<I", 48),
     "metadata 'general.alignment': must be a positive power of two, got 48"),
    ("alignment a string", rewrite("general.alignment", TypedValue("32", STRING)),
     "metadata 'general.alignment': must be a positive power of two, got '32'"),
    ("head_count 0", set_value("llama.attention.head_count", "<I", 0),
     "'llama.attention.head_count' must be a positive integer below 2**31, got 0"),
    ("embedding_length 0", set_value("llama.embedding_length", "<I", 0),
     "'llama.embedding_length' must be a positive integer below 2**31, got 0"),
    ("head_count_kv 0", set_value("llama.attention.head_count_kv", "<I", 0),
     "'llama.attention.head_count_kv' must be a positive integer below 2**31, got 0"),
    ("heads not a multiple of kv heads", set_value("llama.attention.head_count", "<I", 3),
     "'llama.attention.head_count' = 3 is not a multiple of 'llama.attention.head_count_kv' = 2"),
    ("rope base NaN", set_value("llama.rope.freq_base", "<f", math.nan),
     "'llama.rope.freq_base' must be a positive number, got nan"),
    ("block_count a string", rewrite("llama.block_count", TypedValue("2", STRING)),
     "'llama.block_count' must be a positive integer below 2**31, got '2'"),
    ("zero-sized dimension", tensor_field("blk.0.attn_q.weight", "dim1", 0),
     "tensor 'blk.0.attn_q.weight' has a zero-sized dimension (shape (0, 64))"),
    ("arrays nested 200k deep", nested_arrays(200_000),
     "metadata 'deep': arrays nested more than 4 deep at byte"),
    ("a dimension of 2**40 (show said 'T' parameters)",
     tensor_field("output.weight", "dim1", 2**40),
     "the file is truncated: tensor 'output.weight' needs bytes up to"),
    ("tensor data cut off", cut(-100),
     "the file is truncated: tensor 'output.weight' needs bytes up to"),
    # --- the header itself
    ("version 99", header_field(4, 99), "the header: GGUF version 99 is not supported"),
    ("tensor count 2**63", header_field(8, 2**63),
     f"the header: it declares {2**63} tensors and"),
    ("key count 2**62", header_field(16, 2**62), f"tensors and {2**62} metadata keys, more than"),
    # the same over zeros (in the size test): a blind loop would read 2**62 empty keys
    ("2**62 keys, then nothing", bare_file(0, 2**62), f"0 tensors and {2**62} metadata keys"),
    ("2**40 tensors, then nothing", bare_file(2**40, 1), f"{2**40} tensors and 1 metadata keys"),
    ("header cut early", cut(26),
     "it declares 21 tensors and 24 metadata keys, more than the 2 bytes after it can hold"),
    ("header cut inside the vocabulary", cut(2000),
     "metadata 'tokenizer.ggml.tokens': an array of 384 items at byte 226 cannot fit in the "
     "1762 bytes left"),
    ("header cut inside a number", cut_after("tokenizer.ggml.token_type", 2),
     "metadata 'tokenizer.ggml.token_type': the file ends at byte"),
    ("first key 2**62 bytes long", header_field(24, 2**62),
     f"metadata key #0: a string of {2**62} bytes at byte 24 runs past the end of the file"),
    ("string value 2**60 bytes long", at_key("general.architecture", 4, "<Q", 2**60),
     f"metadata 'general.architecture': a string of {2**60} bytes"),
    ("unknown value type", at_key("general.type", 0, "<I", 99),
     "metadata 'general.type': unknown GGUF value type 99"),
    ("unknown array item type", at_key("tokenizer.ggml.token_type", 4, "<I", 99),
     "metadata 'tokenizer.ggml.token_type': an array at byte"),
    ("array count 2**60", at_key("tokenizer.ggml.token_type", 8, "<Q", 2**60),
     f"metadata 'tokenizer.ggml.token_type': an array of {2**60} items at byte"),
    ("non-UTF-8 value", at_key("general.type", 12, "<B", 0xFF),
     "metadata 'general.type': the string at byte"),
    ("non-UTF-8 key", rename("general.type", "\xffeneral.type"),
     "metadata key #1: the string at byte"),
    ("duplicate key", rename("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"),
     "metadata 'tokenizer.ggml.eos_token_id': appears twice"),
    # --- the tensor directory
    ("5 dimensions", tensor_field("blk.0.attn_q.weight", "n_dims", 5),
     "tensor 'blk.0.attn_q.weight' has 5 dimensions (a GGUF tensor has 1 to 4)"),
    ("2**32-1 dimensions", tensor_field("blk.0.attn_q.weight", "n_dims", 2**32 - 1),
     f"tensor 'blk.0.attn_q.weight' has {2**32 - 1} dimensions"),
    ("shape overflows int64", tensor_field("blk.0.attn_q.weight", "dim1", 2**62),
     "tensor 'blk.0.attn_q.weight' shape (4611686018427387904, 64) has more elements than fit"),
    ("unknown tensor type", tensor_field("blk.0.attn_q.weight", "type", 999),
     "tensor 'blk.0.attn_q.weight' has unknown ggml type id 999"),
    ("row not whole blocks", tensor_field("blk.0.attn_q.weight", "type", 12),
     "tensor 'blk.0.attn_q.weight' row length 64 is not a multiple of the Q4_K block size 256"),
    ("duplicate tensor name", rename("blk.0.attn_k.weight", "blk.0.attn_q.weight"),
     "tensor 'blk.0.attn_q.weight' appears twice in the tensor directory"),
    ("misaligned offset", tensor_field("blk.0.attn_q.weight", "offset", 32 * 1000 + 4),
     "tensor 'blk.0.attn_q.weight' offset 32004 is not a multiple of the alignment 32"),
    ("overlapping tensors", same_offset("blk.0.attn_k.weight", "blk.0.attn_q.weight"),
     "overlaps tensor"),
    # --- metadata that does not describe a model
    ("architecture missing", rename("general.architecture", "general.architecturX"),
     "metadata 'general.architecture': is missing"),
    ("block_count missing", rename("llama.block_count", "llama.block_counX"),
     "GGUF metadata lacks 'llama.block_count'"),
    ("vocabulary missing",
     chain(rename("llama.vocab_size", "llama.vocab_sizX"),
           rename("tokenizer.ggml.tokens", "tokenizer.ggml.tokenX")),
     "GGUF metadata has neither 'llama.vocab_size' nor a 'tokenizer.ggml.tokens' list"),
    ("more layers than tensors", set_value("llama.block_count", "<I", 3),
     "llama.block_count is 3, but the file holds only 21 tensors (a layer has 9)"),
    ("block_count 2**31-1", set_value("llama.block_count", "<I", 2**31 - 1),
     f"llama.block_count is {2**31 - 1}, but the file holds only 21 tensors"),
    ("a layer's tensor missing", rename("blk.1.ffn_up.weight", "blk.1.ffn_up.weighX"),
     "tensor 'blk.1.ffn_up.weight' is missing (llama.block_count is 2)"),
    ("fewer layers than tensors", set_value("llama.block_count", "<I", 1),
     "tensor 'blk.1.attn_norm.weight' belongs to layer 1, but llama.block_count is 1"),
    ("shapes disagree with embedding_length", set_value("llama.embedding_length", "<I", 32),
     "tensor 'token_embd.weight' has shape"),
    ("bos id past the vocabulary", set_value("tokenizer.ggml.bos_token_id", "<I", 10**6),
     "metadata 'tokenizer.ggml.bos_token_id' must be a token id in 0.."),
    ("tokens are numbers", rewrite("tokenizer.ggml.tokens", TypedValue([1, 2], ARRAY, U32)),
     "metadata 'tokenizer.ggml.tokens' must be a list of strings"),
    ("a merge that makes an unknown token",
     rewrite("tokenizer.ggml.merges", TypedValue(["zz qq"], ARRAY, STRING)),
     "metadata 'tokenizer.ggml.merges': the merge 'zz qq' makes a token that is not in the"),
    ("merges are numbers", rewrite("tokenizer.ggml.merges", TypedValue([1, 2], ARRAY, U32)),
     "metadata 'tokenizer.ggml.merges' must be a list of strings"),
]  # fmt: skip


def make(base: Path, tmp_path: Path, corruption: Callable[[Path], bytes]) -> Path:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corruption(base))
    return bad


# ---------------------------------------------------------------- the valid file is valid
def test_the_base_file_is_valid(base, capsys):
    config, weights, tokenizer = read_model_files(base)
    assert (config.num_layers, config.hidden_size, config.num_heads) == (2, 64, 4)
    assert len(GGUFReader(base).tensors) == len(read_header(base).tensors) == 2 + 2 * 9 + 1
    assert main(["show", str(base)]) == 0
    assert "parameters" in capsys.readouterr().out


# ---------------------------------------------------------------- Python: one ValueError
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loading_raises_one_clear_value_error(base, tmp_path, case):
    _, corruption, message = case
    bad = make(base, tmp_path, corruption)
    start = time.monotonic()
    with pytest.raises(ValueError) as caught:  # GGUFError is a ValueError
        read_model_files(bad)
    text = str(caught.value)
    assert text.startswith(f"{bad}: ") and message in text, text
    assert "\n" not in text
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_show_prints_one_error_line_and_exits_1(base, tmp_path, capsys, case):
    _, corruption, message = case
    bad = make(base, tmp_path, corruption)
    code = main(["show", str(bad)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"Error: {bad}: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


BOMBS = [c for c in CASES if "2**" in c[0] or "deep" in c[0]]


@pytest.mark.parametrize("case", BOMBS, ids=[c[0] for c in BOMBS])
def test_absurd_sizes_cost_no_memory_and_no_time(base, tmp_path, case):
    """Counts and lengths are checked before anything is allocated or looped over, even in a
    big file (64 MiB of zeros appended, sparse on disk) that a blind loop would walk through."""
    bad = make(base, tmp_path, case[1])
    os.truncate(bad, bad.stat().st_size + 64 * 2**20)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(GGUFError):
            check_gguf_model(bad)  # the header, then what it says (what `show` runs)
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2 and peak < 16 * 2**20, (seconds, peak)


# ---------------------------------------------------------------- caught only at load time
LOAD_ONLY: list[Case] = [
    ("an architecture minillm does not run", at_key("general.architecture", 12, "5s", b"qwen3"),
     "unsupported architecture 'qwen3' in GGUF metadata"),
    ("a tensor type minillm cannot compute with", tensor_field("blk.0.attn_q.weight", "type", 25),
     "tensor 'blk.0.attn_q.weight' uses ggml type I16, which minillm does not support"),
    ("a merge without a space", merges_of(lambda tokens: [tokens[-1]]),
     "the tokenizer cannot be built from its metadata"),
    ("a merge with an empty half", merges_of(lambda tokens: [" " + tokens[-1]]),
     "the tokenizer cannot be built from its metadata"),
    ("a chat template that does not compile", rewrite("tokenizer.chat_template", TypedValue("{% for %}", STRING)),
     "chat template has a syntax error"),
]  # fmt: skip


@pytest.mark.parametrize("case", LOAD_ONLY, ids=[c[0] for c in LOAD_ONLY])
def test_load_time_errors_name_the_file(base, tmp_path, capfd, case):
    """What only loading can find (the tokenizer builder, the template compiler, a type with no
    kernel): `show` still describes the file, loading names the file and says why not."""
    from minillm.loader import load_model

    _, corruption, message = case
    bad = make(base, tmp_path, corruption)
    assert main(["show", str(bad)]) == 0
    with pytest.raises(ValueError) as caught:
        load_model(bad, backend="ref")
    text = str(caught.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text, text
    assert "panicked" not in capfd.readouterr().err  # `tokenizers` panics print to fd 2


# ---------------------------------------------------------------- the real command line
def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m minillm.cli ARGS`, as a user runs it (a real process: a traceback shows)."""
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=dict(os.environ),
    )


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["run", "serve", "show"])
def test_commands_fail_with_one_line(base, tmp_path, free_port, command):
    bad = make(base, tmp_path, set_value("general.alignment", "<I", 0))
    extra = {"run": ["hi", "--max-tokens", "1"], "serve": ["--port", str(free_port())]}
    done = cli(command, str(bad), *extra.get(command, []))
    _one_error_line(done, str(bad), "general.alignment")


def test_show_fails_on_a_truncated_file(base, tmp_path):
    bad = make(base, tmp_path, cut(-100))
    _one_error_line(cli("show", str(bad)), str(bad), "truncated", "output.weight")


def test_create_checks_the_from_file(base, tmp_path, home):
    bad = make(base, tmp_path, set_value("llama.attention.head_count", "<I", 0))
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {bad}\nSYSTEM You are terse.\n")
    done = cli("create", "broken", "-f", str(modelfile))
    _one_error_line(done, str(modelfile), str(bad), "llama.attention.head_count")
    assert not (home / "manifests").exists() or not any((home / "manifests").iterdir())
    good = tmp_path / "Modelfile.good"
    good.write_text(f"FROM {base}\n")
    assert main(["create", "fine", "-f", str(good)]) == 0
