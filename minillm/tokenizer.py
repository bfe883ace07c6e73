"""Text <-> token ids: a byte-level BPE built from GGUF metadata or a Hugging Face folder.

The heavy lifting (BPE merges, special-token splitting, byte-level decoding) is done by the
Rust `tokenizers` library; this module's job is to *assemble* the right pipeline from what a
model file says, because a GGUF carries no tokenizer.json, only llama.cpp's metadata keys:

    tokenizer.ggml.model       "gpt2" = byte-level BPE; "llama" = SentencePiece, for Gemma only
                               (tokenizer_gemma.py rebuilds it)
    tokenizer.ggml.pre         which regex splits text into words before BPE ("smollm", "qwen2", ...)
    tokenizer.ggml.tokens      the vocabulary, index = token id
    tokenizer.ggml.merges      "a b" pairs, best first
    tokenizer.ggml.token_type  1 normal, 3 control (special), 4 user-defined (added), ...

A wrong pre-tokenizer does not crash: it silently produces different ids than the model was
trained on, and the model gets a little dumber. So unknown kinds raise instead of guessing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from minillm.tokenizer_gemma import gemma_backend

# llama.cpp's token_type values (enum llama_token_type in GGUF files).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Word-splitting regexes of the model families we support. They are part of each model's
# definition (its tokenizer.json / llama.cpp's llama-vocab.cpp), not a tuning choice.
# Llama 3 groups digits in threes; Qwen2 splits every digit.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    """GPT-2's own regex, built into ByteLevel(use_regex=True)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre() -> pre_tokenizers.PreTokenizer:
    """SmolLM / StarCoder: every digit is its own word, then GPT-2's regex on the rest.

    This is what SmolLM2's tokenizer.json declares and what llama.cpp does for pre="smollm"
    (regexes "\\p{N}" then GPT-2's). It differs from plain GPT-2 on a run of spaces before a
    digit: "a  1" -> "a", "  ", "1" (GPT-2 would give "a", " ", " 1").
    """
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_then_bytes_pre(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer that model family was trained with.
PRE_TOKENIZERS = {
    "gpt-2": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre,
    "starcoder": _digits_then_gpt2_pre,
    "llama-bpe": lambda: _split_then_bytes_pre(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes_pre(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes_pre(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes_pre(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _split_then_bytes_pre(_QWEN2_SPLIT),
}

# Text of tokens that end a turn or a document in common chat formats. A control token with
# one of these names stops generation even when the file's eos id points elsewhere (llama.cpp
# keeps a similar "end of generation" list), e.g. `<|im_end|>` next to `<|endoftext|>`.
END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|end|>",
        "<end_of_turn>",
    }
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a model file says around it (bos/eos, chat template).

    Build one with `from_gguf_metadata` or `from_pretrained_dir`; `backend` is the Rust object.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._extra_eos_token_ids = frozenset(int(i) for i in extra_eos_token_ids)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (see the module docstring for the keys)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: no tokenizer to build")
        sentencepiece = kind == "llama" and metadata.get("general.architecture") == "gemma3"
        if kind != "gpt2" and not sentencepiece:
            raise ValueError(
                f"unsupported tokenizer.ggml.model {kind!r}: minillm builds byte-level BPE "
                "('gpt2') tokenizers from GGUF, and SentencePiece ('llama') ones for Gemma 3 "
                "only; WordPiece ('bert') and others are not supported. Load the model's "
                "Hugging Face folder instead."
            )
        tokens: list[str] = list(_require(metadata, "tokenizer.ggml.tokens"))
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"GGUF metadata has {len(tokens)} tokens but {len(types)} token types")

        if sentencepiece:
            unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
            if not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
                raise ValueError("a SentencePiece GGUF needs tokenizer.ggml.unknown_token_id")
            backend = gemma_backend(tokens, types, tokens[unk_id])
        else:
            merges = [tuple(m.split(" ", 1)) for m in _require(metadata, "tokenizer.ggml.merges")]
            backend = BackendTokenizer(
                models.BPE(
                    vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, fuse_unk=False
                )
            )
            backend.pre_tokenizer = _pre_tokenizer_for(metadata.get("tokenizer.ggml.pre"))
            backend.decoder = decoders.ByteLevel()
            _register_added_tokens(backend, tokens, types)

        def token_at(key: str) -> str | None:
            index = metadata.get(key)
            if index is None:
                return None
            if not 0 <= int(index) < len(tokens):
                raise ValueError(f"{key}={index} is outside the vocabulary (0..{len(tokens) - 1})")
            return tokens[int(index)]

        bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
        _set_bos_eos_post_processor(
            backend,
            # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say
            bos if metadata.get("tokenizer.ggml.add_bos_token", sentencepiece) else None,
            eos if metadata.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        extra_eos = [
            int(metadata[k])
            for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if metadata.get(k) is not None
        ]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            chat_template=metadata.get("tokenizer.chat_template"),
            extra_eos_token_ids=extra_eos,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face folder: tokenizer.json, plus tokenizer_config.json if present.

        Mirrors transformers 5: special tokens named in the config become special added tokens,
        and whether BOS/EOS are added is decided by tokenizer.json's post-processor alone (the
        config's add_bos_token/add_eos_token are ignored when a tokenizer.json exists).
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")

        named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token")}
        named["pad_token"] = _token_text(config.get("pad_token"))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        specials = [t for t in [*named.values(), *map(_token_text, extra)] if t]
        if specials:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in specials]
            )

        generation = _read_json(folder / "generation_config.json")
        gen_eos = generation.get("eos_token_id")
        extra_eos = (
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )
        return cls(
            backend,
            bos_token=named["bos_token"],
            eos_token=named["eos_token"],
            chat_template=_chat_template_from(folder, config),
            extra_eos_token_ids=extra_eos,
        )

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are parsed
        as themselves, like Hugging Face does; add_special_tokens adds BOS/EOS if the model asks.
        """
        return self.count_and_head(text, None, add_special_tokens)[1]

    def count_and_head(
        self, text: str, keep: int | None, add_special_tokens: bool = True
    ) -> tuple[int, list[int]]:
        """(how many tokens `text` has, its first `keep` ids; None: all of them).

        The batch call of the Rust tokenizer releases the GIL while it works (the single-text
        one does not), so a server can tokenize a huge prompt on a worker thread without
        stalling its event loop; and a prompt far longer than any context is counted without
        building a Python list of its millions of ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encoding = batch([text], add_special_tokens=add_special_tokens)[0]
        count = len(encoding)
        if keep is not None and count > keep:
            encoding.truncate(keep)
        return count, list(encoding.ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation.

        Rule: the declared eos id; ids the file names as end of turn/message (GGUF eot/eom,
        generation_config.json's eos list); and any *special* token whose text is a known
        end-of-turn/end-of-text marker (END_OF_GENERATION_TOKENS). Chat models often declare
        `<|endoftext|>` as eos but close each turn with `<|im_end|>` (or the reverse); stopping
        on both is what llama.cpp and transformers' generation configs do in practice.
        """
        ids = set(self._extra_eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        for token_id, added in self.backend.get_added_tokens_decoder().items():
            if added.special and added.content in END_OF_GENERATION_TOKENS:
                ids.add(token_id)
        return ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text pieces, one `add(id)` at a time.

    Byte-level BPE can split one character (an emoji, a CJK ideograph) across tokens, and
    decoding such a prefix ends in U+FFFD. So we keep two offsets into the ids:

        ids:  ... [prefix_offset ........ read_offset ........ end)
                   `-- already emitted --'`-- not yet emitted --'

    Each step decodes ids[prefix_offset:] and ids[prefix_offset:read_offset]; the difference
    is the new text. It is emitted only when it does not end in U+FFFD (an unfinished
    character); then both offsets move forward. Decoding from prefix_offset rather than from
    read_offset gives the decoder context, so a leading space is not lost (SentencePiece
    decoders strip the first space of a sequence). `flush()` emits whatever is still held.
    With prompt_ids the text is the continuation of the prompt, as the model sees it.
    """

    # How many prompt tokens to keep as left context (enough for any multi-token character).
    CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(i) for i in (prompt_ids or [])]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending_text(self) -> str:
        """Text of the ids after read_offset (possibly ending in an unfinished character)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        return full[len(emitted) :] if len(full) > len(emitted) else ""

    def _advance(self) -> None:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def add(self, token_id: int) -> str:
        """Feed one id; return the new complete text (often "", never half a character)."""
        self.ids.append(int(token_id))
        delta = self._pending_text()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self._advance()
        return delta

    def flush(self) -> str:
        """At the end of the stream: return what was held back (may end in U+FFFD)."""
        delta = self._pending_text()
        self._advance()
        return delta


# ---------------------------------------------------------------------- helpers
def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata lacks {key}, which a byte-level BPE tokenizer needs")
    return metadata[key]


def _pre_tokenizer_for(name: str | None) -> pre_tokenizers.PreTokenizer:
    if name is None or name == "default":
        # llama.cpp warns that such files tokenize poorly; GPT-2's regex is the usual intent.
        warnings.warn(
            f"GGUF tokenizer.ggml.pre is {name!r}; falling back to GPT-2's pre-tokenizer",
            stacklevel=3,
        )
        return _gpt2_pre()
    if name not in PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {name!r}: known pre-tokenizers are "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Splitting text with the wrong regex would "
            "silently produce ids the model was not trained on."
        )
    return PRE_TOKENIZERS[name]()


def _register_added_tokens(
    backend: BackendTokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so
    both are matched whole in the input text instead of being cut into byte pieces."""
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == TOKEN_TYPE_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    size = len(tokens)
    if backend.get_vocab_size(with_added_tokens=True) != size:
        raise ValueError(
            "GGUF vocabulary has duplicate or unmatched added tokens: registering control/"
            f"user-defined tokens grew it from {size} to "
            f"{backend.get_vocab_size(with_added_tokens=True)}"
        )


def _set_bos_eos_post_processor(
    backend: BackendTokenizer, bos: str | None, eos: str | None
) -> None:
    """encode(add_special_tokens=True) prepends `bos` / appends `eos` when they are given."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join(
        [single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    )
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    missing = [t for t, i in specials if i is None]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict(specials).items())
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as "text" or as {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template_from(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (newer transformers) wins over tokenizer_config.json's field, which
    may be a string or a list of named templates (we take "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
