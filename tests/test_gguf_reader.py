"""Our GGUF reader against the `gguf` package's own GGUFReader, and its errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from minillm.formats.gguf import GGUFError, GGUFFile, read_header, read_metadata


@pytest.fixture(scope="module")
def pair(bundled_gguf_path):
    return GGUFFile(bundled_gguf_path), GGUFReader(bundled_gguf_path)


def test_metadata_equals_gguf_package(pair):
    ours, theirs = pair
    expected = {}
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        expected[name] = value
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key


def test_tensor_bytes_equal_gguf_package(pair):
    ours, theirs = pair
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for t in theirs.tensors:
        q = ours.tensors[t.name]
        assert q.format == t.tensor_type.name
        assert q.shape == tuple(reversed([int(d) for d in t.shape]))
        assert np.array_equal(q.data, np.asarray(t.data).view(np.uint8).reshape(q.data.shape))


def test_header_only_read_matches(bundled_gguf_path, pair):
    header = read_header(bundled_gguf_path)
    assert header.version == 3
    assert {t.name: (t.type_name, t.shape) for t in header.tensors} == {
        n: (q.format, q.shape) for n, q in pair[0].tensors.items()
    }
    assert read_metadata(bundled_gguf_path)["general.architecture"] == "llama"


@pytest.mark.parametrize("cut", [10, 100_000, 2_000_000, 50_000_000])
def test_truncated_file_is_named(bundled_gguf_path, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(bundled_gguf_path, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(bad)


def test_not_a_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(junk)
    with pytest.raises(GGUFError, match="not found"):
        GGUFFile(tmp_path / "missing.gguf")
