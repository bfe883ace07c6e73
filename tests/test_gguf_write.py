"""The GGUF writer: files it writes are read back the same by minillm, gguf-py and transformers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFValueType

from minillm import LLM, SamplingParams
from minillm.config import ModelConfig
from minillm.formats.blocks import BLOCK_LAYOUT, QuantTensor, quantize
from minillm.formats.gguf import GGUFFile, read_metadata
from minillm.formats.gguf_write import (
    TypedValue,
    gguf_tensors,
    metadata_for_hf_model,
    model_metadata,
    permute_rows,
    read_typed_metadata,
    save_model_gguf,
    write_gguf,
)
from minillm.formats.int8_rows import fold_int8_rows, int8_row_tensors
from minillm.loader import read_model_files
from minillm.model.weights import ModelWeights, unpermute_rows
from minillm.testing import make_tiny_model


def to_q8_0(weights: ModelWeights) -> ModelWeights:
    """Every matrix in Q8_0, vectors (norms, biases) as they are."""

    def q(t: QuantTensor | None) -> QuantTensor | None:
        return t if t is None or len(t.shape) == 1 else quantize(t.dequantize(), "Q8_0")

    layers = [replace(lw, **{k: q(v) for k, v in vars(lw).items()}) for lw in weights.layers]
    return ModelWeights(q(weights.embed), layers, weights.final_norm, q(weights.lm_head))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_q8(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("gw") / request.param, request.param, seed=4)
    config, weights, tokenizer = read_model_files(folder)
    q8 = to_q8_0(weights)
    path = save_model_gguf(
        folder / "model-q8_0.gguf", config, q8, metadata_for_hf_model(config, tokenizer), "Q8_0"
    )
    return folder, path, config, q8, tokenizer


def test_minillm_reads_back_the_same_weights(tiny_q8):
    _, path, config, q8, _ = tiny_q8
    _, loaded, _ = read_model_files(path)
    for ours, back in zip(
        [q8.embed, q8.final_norm, q8.lm_head, *[t for lw in q8.layers for t in vars(lw).values()]],
        [loaded.embed, loaded.final_norm, loaded.lm_head,
         *[t for lw in loaded.layers for t in vars(lw).values()]],
        strict=True,
    ):  # fmt: skip
        if ours is None:
            assert back is None
            continue
        assert back.format == ours.format and back.shape == ours.shape
        # Q/K rows went through llama.cpp's permutation and back: the bytes must be identical
        assert np.array_equal(back.data, ours.data)


def test_gguf_reader_agrees(tiny_q8):
    _, path, config, q8, tokenizer = tiny_q8
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == config.arch
    assert fields["general.file_type"] == 7  # llama.cpp's MOSTLY_Q8_0
    assert fields[f"{config.arch}.block_count"] == config.num_layers
    assert reader.fields[f"{config.arch}.block_count"].types == [GGUFValueType.UINT32]
    assert fields["tokenizer.ggml.tokens"][:3] == [tokenizer.id_to_token(i) for i in range(3)]
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    named = gguf_tensors(config, q8)
    assert [t.name for t in reader.tensors] == list(named)
    for t in reader.tensors:
        ours = named[t.name]
        assert t.tensor_type.name == ours.format
        assert tuple(reversed([int(d) for d in t.shape])) == ours.shape
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(ours.data.shape), ours.data)


def test_transformers_and_minillm_generate_the_same_tokens(tiny_q8):
    folder, path, config, _, _ = tiny_q8
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = LLM(str(path), backend="ref", block_size=4)
    for prompt in ([5, 9, 11, 40, 3], list(range(30, 60))):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert llm.generate([prompt], params)[0].outputs[0].token_ids == ref


def test_tokenizer_survives_the_gguf_round_trip(tiny_q8):
    folder, path, _, _, tokenizer = tiny_q8
    llm = LLM(str(path), backend="ref")
    text = "def add(a, b): return a + b  # 大模型 123 <|im_end|>"
    assert llm.tokenizer.encode(text) == tokenizer.encode(text)
    assert llm.tokenizer.eos_token_id == tokenizer.eos_token_id
    assert llm.tokenizer.chat_template == tokenizer.chat_template


def test_permutation_is_the_inverse_of_the_loaders():
    for rows, heads in ((24, 3), (576, 9), (64, 1)):
        idx = permute_rows(rows, heads)
        assert np.array_equal(np.arange(rows)[idx][unpermute_rows(rows, heads)], np.arange(rows))
        assert not np.array_equal(idx, np.arange(rows))
    with pytest.raises(ValueError, match="do not split"):
        permute_rows(10, 3)


def test_typed_metadata_of_the_bundled_model(bundled_gguf_path):
    typed = read_typed_metadata(bundled_gguf_path)
    plain = read_metadata(bundled_gguf_path)
    assert {k: v.value for k, v in typed.items()} == plain
    assert typed["llama.block_count"].type == GGUFValueType.UINT32
    assert typed["llama.rope.freq_base"].type == GGUFValueType.FLOAT32
    tokens = typed["tokenizer.ggml.tokens"]
    assert (tokens.type, tokens.item_type) == (GGUFValueType.ARRAY, GGUFValueType.STRING)


def test_metadata_copies_the_source_and_redoes_shapes(bundled_gguf_path):
    source = read_typed_metadata(bundled_gguf_path)
    config = ModelConfig.from_gguf_metadata({k: v.value for k, v in source.items()})
    pruned = replace(config, num_heads=6, intermediate_size=1024)
    md = model_metadata(pruned, source, "Q4_K")
    assert md["general.file_type"].value == 15  # MOSTLY_Q4_K_M
    assert md["llama.attention.head_count"] == TypedValue(6, GGUFValueType.UINT32)
    assert md["llama.feed_forward_length"].value == 1024
    assert md["llama.attention.key_length"].value == 64  # 6 * 64 != 576: must be explicit
    assert md["tokenizer.ggml.merges"] is source["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="no llama.cpp file type"):
        model_metadata(config, source, "Q9_9")
    with pytest.raises(ValueError, match="source metadata is for 'llama'"):
        model_metadata(replace(config, arch="qwen2", attention_bias=True), source, "Q8_0")


def test_int8_rows_are_written_and_folded(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (6, 32)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 6).astype(np.float32)
    tensors = {"norm.weight": quantize(np.ones(32, np.float32), "F32")}
    tensors.update(int8_row_tensors("blk.0.w.weight", q, scale))
    meta = {"general.name": TypedValue("t", GGUFValueType.STRING)}
    path = write_gguf(tmp_path / "i8.gguf", "llama", tensors, meta)
    f = GGUFFile(path)
    assert np.array_equal(f.int8_tensors["blk.0.w.weight"], q)
    folded = fold_int8_rows(f.tensors, f.int8_tensors)
    assert "blk.0.w.weight.scale" not in folded
    expected = q.astype(np.float32) * scale[:, None]
    assert np.array_equal(folded["blk.0.w.weight"].dequantize(), expected)
    assert [t.tensor_type.name for t in GGUFReader(path).tensors] == ["F32", "I8", "F32"]
    with pytest.raises(ValueError, match="has no 'x.scale'"):
        fold_int8_rows({}, {"x": q})
    with pytest.raises(ValueError, match="6 rows but 5 row scales"):
        int8_row_tensors("x", q, scale[:5])
    with pytest.raises(TypeError, match="QuantTensor or an int8/float32"):
        write_gguf(tmp_path / "bad.gguf", "llama", {"x": np.zeros(3, np.int64)}, meta)


def test_f32_gguf_is_the_original_model_for_transformers(tiny_q8):
    # An independent check of names and the Q/K permutation: transformers reading our lossless
    # F32 file must compute what transformers computes from the original HF folder.
    folder, _, config, _, tokenizer = tiny_q8
    _, weights, _ = read_model_files(folder)
    path = save_model_gguf(
        folder / "model-f32.gguf", config, weights, metadata_for_hf_model(config, tokenizer), "F32"
    )
    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=path.name, dtype=torch.float32
    )
    ids = torch.tensor([[(7 * i) % config.vocab_size for i in range(1, 40)]])
    with torch.no_grad():
        want, got = original(ids).logits, from_gguf(ids).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bundled_model_written_as_q8_0_runs_alike_in_transformers(bundled_gguf_path, tmp_path):
    from minillm.compress.export import save_quantized_gguf, source_metadata
    from minillm.compress.quantize import quantize_model

    config, weights, tokenizer = read_model_files(bundled_gguf_path)
    qm = quantize_model(config, weights, "q8_0")
    path = save_quantized_gguf(
        qm, tmp_path / "smollm2-q8_0.gguf", source_metadata(bundled_gguf_path, config, tokenizer)
    )
    source, written = read_metadata(bundled_gguf_path), read_metadata(path)
    assert {k for k in written if not k.startswith("minillm.")} == set(source)
    assert written["general.file_type"] == 7 and written["minillm.quantization"] == "q8_0"
    assert written["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = LLM(str(path), backend="ref")
    prompt = llm.tokenizer.encode(
        llm.apply_chat_template([{"role": "user", "content": "What is a KV cache?"}])
    )
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == ref


def test_every_block_format_round_trips(tmp_path):
    # Each format we hold is written under its ggml type (Q5_0 is type 6) and read back, by
    # minillm and by gguf-py, as the same type and the same bytes.
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    tensors = {f"t.{fmt}": quantize(x, fmt) for fmt in BLOCK_LAYOUT}
    meta = {"general.name": TypedValue("t", GGUFValueType.STRING)}
    path = write_gguf(tmp_path / "all.gguf", "llama", tensors, meta)
    back = GGUFFile(path).tensors
    for name, t in tensors.items():
        assert back[name].format == t.format and back[name].shape == t.shape
        assert np.array_equal(back[name].data, t.data)
    types = {t.name: (t.tensor_type.name, int(t.tensor_type)) for t in GGUFReader(path).tensors}
    assert types["t.Q5_0"] == ("Q5_0", 6)
    assert all(types[name][0] == t.format for name, t in tensors.items())
