"""minillm.tokenizer against Hugging Face transformers on the same vocabulary.

References:
- transformers' own GGUF loader on the bundled SmolLM2 GGUF (its vocab/merges/special-token
  conversion is independent of ours);
- SmolLM2's upstream pre-tokenizer, as declared in the model repo's tokenizer.json and as
  llama.cpp implements pre="smollm" (digits split one by one, then GPT-2's regex). transformers'
  GGUF loader does not know "smollm" and falls back to plain GPT-2 splitting, which differs on
  whitespace before a digit ("a  1"); we follow the model's definition, and test both facts;
- tiny GGUFs written here with `gguf`'s writer for the qwen2 / llama-bpe / gpt-2 pre-tokenizers,
  loaded by transformers too;
- a tiny tokenizer.json trained here with `tokenizers`, loaded by PreTrainedTokenizerFast.
"""

from __future__ import annotations

import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest

from minillm.formats.gguf import read_metadata
from minillm.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS_FILE = Path(__file__).parent / "data" / "tokenizer_corpus.py"

# SmolLM2's tokenizer.json (HuggingFaceTB/SmolLM2-135M-Instruct) declares this pre-tokenizer.
SMOLLM2_UPSTREAM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _load_corpus() -> list[str]:
    spec = importlib.util.spec_from_file_location("tokenizer_corpus", CORPUS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.corpus()


CORPUS = _load_corpus()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def metadata(bundled_gguf_path: Path) -> dict:
    return read_metadata(bundled_gguf_path)


@pytest.fixture(scope="module")
def ours(metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def hf(bundled_gguf_path: Path):
    """transformers' tokenizer built from the same GGUF file, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(bundled_gguf_path.parent), gguf_file=bundled_gguf_path.name
    )


@pytest.fixture(scope="module")
def hf_upstream(hf):
    """transformers' conversion of the GGUF vocabulary, with SmolLM2's upstream pre-tokenizer."""
    from tokenizers import Tokenizer as BackendTokenizer

    spec = json.loads(hf.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = SMOLLM2_UPSTREAM_PRE_TOKENIZER
    return BackendTokenizer.from_str(json.dumps(spec))


def _whitespace_before_number(text: str) -> bool:
    return any(
        a.isspace() and unicodedata.category(b) in ("Nd", "Nl", "No")
        for a, b in zip(text, text[1:], strict=False)
    )


# ---------------------------------------------------------------------- the corpus itself
def test_corpus_is_large_and_covers_the_hard_cases():
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) == len(CORPUS)
    joined = "".join(CORPUS)
    assert "" in CORPUS
    for needle in [
        "\r\n",
        "\t",
        "   ",
        "\u200d",
        "\U0001f3fd",
        "你好",
        "こんにちは",
        "<|im_start|>",
    ]:
        assert needle in joined, needle
    assert any(s != s.strip() for s in CORPUS)  # leading/trailing whitespace


# ---------------------------------------------------------------------- encode
def test_ids_equal_transformers_with_smollm2_pre_tokenizer_on_every_string(ours, hf_upstream):
    differ = [s for s in CORPUS if ours.encode(s) != hf_upstream.encode(s).ids]
    assert differ == [], f"{len(differ)}/{len(CORPUS)} strings differ, e.g. {differ[:3]!r}"


def test_ids_equal_transformers_gguf_loader_except_whitespace_before_digits(ours, hf):
    """transformers' GGUF loader splits "smollm" text like GPT-2; the only strings where we
    may differ are those with whitespace right before a number. Everything else must agree."""
    differ = [s for s in CORPUS if ours.encode(s) != hf.encode(s)]
    unexplained = [s for s in differ if not _whitespace_before_number(s)]
    assert unexplained == []
    print(f"\nagreement with transformers' GGUF loader: {len(CORPUS) - len(differ)}/{len(CORPUS)}")


def test_ids_of_whitespace_before_digits_follow_the_model_definition(ours, hf, hf_upstream):
    """The divergence is real and goes the upstream way: "a  1" keeps "  " as one token."""
    text = "a  1"
    assert ours.encode(text) == hf_upstream.encode(text).ids
    assert ours.encode(text) != hf.encode(text)
    assert ours.id_to_token(ours.encode(text)[1]) == "\u0120\u0120"  # "ĠĠ": both spaces


def test_special_tokens_in_text_are_parsed(ours, hf):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == hf.convert_tokens_to_ids("<|im_end|>")
    # A near miss is ordinary text.
    assert hf.convert_tokens_to_ids("<|im_start|>") not in ours.encode("<|im_start")


def test_no_bos_added_because_the_gguf_says_so(ours, hf, metadata):
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    assert ours.encode("hello") == ours.encode("hello", add_special_tokens=False)
    assert ours.encode("hello") == hf.encode("hello")


def test_vocabulary_and_named_tokens_match(ours, hf):
    assert ours.vocab_size == len(hf)
    assert ours.bos_token == hf.bos_token and ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token == hf.eos_token and ours.eos_token_id == hf.eos_token_id
    sample = list(range(0, ours.vocab_size, 97)) + list(range(20))
    assert [ours.id_to_token(i) for i in sample] == hf.convert_ids_to_tokens(sample)
    for token in ["<|im_end|>", "\u0120the", "hello"]:
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
    assert ours.chat_template == hf.chat_template


def test_eos_token_ids_hold_the_turn_end_and_are_all_special(ours):
    eos = ours.eos_token_ids
    assert ours.eos_token_id in eos
    assert ours.token_to_id("<|im_end|>") in eos  # what the chat template closes turns with
    assert eos <= ours.special_token_ids


def test_eos_token_ids_include_im_end_when_eos_is_endoftext(metadata):
    md = dict(metadata, **{"tokenizer.ggml.eos_token_id": 0})
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.eos_token == "<|endoftext|>"
    assert {0, tok.token_to_id("<|im_end|>")} <= tok.eos_token_ids


# ---------------------------------------------------------------------- decode
def test_decode_equals_transformers_and_round_trips(ours, hf):
    round_trips = 0
    for text in CORPUS:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), text
        if hf.decode(hf.encode(text)) == text:
            assert ours.decode(ids) == text
            round_trips += 1
    assert round_trips >= len(CORPUS) - 5


def test_decode_rejects_ids_outside_the_vocabulary(ours):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(TypeError, match="str"):
        ours.encode(b"bytes")


# ---------------------------------------------------------------------- incremental decode
def _stream(tokenizer: Tokenizer, ids: list[int], skip: bool, prompt=None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_corpus_really_splits_characters_across_tokens(ours):
    """Guard for the next test: naive per-token decoding must produce U+FFFD somewhere."""
    split = [s for s in CORPUS if any("\ufffd" in ours.decode([i]) for i in ours.encode(s))]
    assert len(split) >= 10


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_never_emits_half_characters(ours, skip):
    for text in CORPUS:
        ids = ours.encode(text)
        deltas = _stream(ours, ids, skip)
        full = ours.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), text
        assert "".join(deltas) == full, text


def test_incremental_detokenizer_continues_a_prompt(ours):
    prompt = ours.encode("<|im_start|>user\n写一首诗<|im_end|>\n<|im_start|>assistant\n")
    gen = ours.encode("好的 👩🏽‍💻：春眠不觉晓，处处闻啼鸟。")
    deltas = _stream(ours, gen, skip=True, prompt=prompt)
    assert "".join(deltas) == ours.decode(gen, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # it streams, not one lump at the end


def test_incremental_detokenizer_flushes_an_unfinished_character(ours):
    ids = ours.encode("ok 😀")
    cut = ids[:-1]  # the emoji's last byte token is missing
    assert ours.decode(cut).endswith("\ufffd")
    deltas = _stream(ours, cut, skip=True)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == ours.decode(cut)


# ---------------------------------------------------------------------- other pre-tokenizers
def _train_byte_level_vocab(split_pre) -> tuple[list[str], list[str]]:
    """A small byte-level BPE trained on corpus text, returned as GGUF tokens and merges."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = split_pre
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [""] * len(model["vocab"])
    for token, index in model["vocab"].items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _write_tokenizer_gguf(path: Path, arch: str, pre: str, tokens, merges, add_bos: bool) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "pre", "add_bos"),
    [("qwen2", "qwen2", False), ("llama", "llama-bpe", True), ("gpt2", "gpt-2", False)],
)
def test_tiny_gguf_pre_tokenizers_match_transformers(tmp_path, arch, pre, add_bos):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokens, merges = _train_byte_level_vocab(pre_tokenizers.ByteLevel(add_prefix_space=False))
    gguf_path = tmp_path / f"tiny-{pre}.gguf"
    _write_tokenizer_gguf(gguf_path, arch, pre, tokens, merges, add_bos)

    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    differ = [s for s in CORPUS if ours.encode(s) != hf.encode(s)]
    assert differ == [], f"{pre}: {len(differ)}/{len(CORPUS)} differ, e.g. {differ[:3]!r}"
    assert (ours.encode("hi")[0] == ours.bos_token_id) is add_bos


# ---------------------------------------------------------------------- Hugging Face folder
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _make_hf_folder(folder: Path, add_bos: bool) -> None:
    """Like a real model folder: whether BOS is added lives in tokenizer.json's post-processor."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [
        "Serving a model means turning weights into an API.",
        "模型部署需要考虑显存、带宽和延迟。",
        "def generate(prompt):\n    return model(prompt)\n",
        "Tokens per second, time to first token, and 99th percentile latency.",
    ]
    tok.train_from_iterator(sentences * 20, trainer)
    if add_bos:
        bos_id = tok.token_to_id("<|im_start|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", bos_id)],
        )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TINY_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("add_bos", [False, True])
def test_pretrained_dir_matches_transformers(tmp_path, add_bos):
    from transformers import PreTrainedTokenizerFast

    _make_hf_folder(tmp_path, add_bos)
    ours = Tokenizer.from_pretrained_dir(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))

    differ = [s for s in CORPUS if ours.encode(s) != hf.encode(s)]
    assert differ == [], f"{len(differ)}/{len(CORPUS)} differ, e.g. {differ[:3]!r}"
    for text in CORPUS[:60]:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        )
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.chat_template == hf.chat_template == TINY_TEMPLATE
    assert (ours.encode("hi")[0] == hf.bos_token_id) is add_bos
    assert ours.eos_token_ids == {hf.eos_token_id, hf.convert_tokens_to_ids("<|im_end|>")}


def test_pretrained_dir_reads_chat_template_jinja_and_generation_eos(tmp_path):
    _make_hf_folder(tmp_path, add_bos=False)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert {0, 7} <= tok.eos_token_ids


def test_pretrained_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)


# ---------------------------------------------------------------------- bad metadata
def test_unsupported_tokenizer_model_is_named(metadata):
    md = dict(metadata, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata(md)


def test_unsupported_pre_tokenizer_is_named(metadata):
    md = dict(metadata, **{"tokenizer.ggml.pre": "falcon"})
    with pytest.raises(ValueError, match="'falcon'"):
        Tokenizer.from_gguf_metadata(md)


def test_missing_tokenizer_keys_are_named(metadata):
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({})
    md = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(md)
    md = dict(metadata, **{"tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_gguf_metadata(md)
