"""Gemma's SentencePiece-style BPE, rebuilt from a GGUF's vocabulary with `tokenizers`.

A Gemma GGUF (tokenizer.ggml.model = "llama") carries tokens, scores and token types but no
merges. SentencePiece's BPE merges the pair whose *result* ranks best, and Gemma's vocabulary
is stored in merge order, so the merges are recovered from the vocabulary itself: every way to
cut a token into two tokens of the vocabulary is a merge, ranked by the token's position (then
longer left half first). That is also how transformers reads these files
(integrations/gguf: `gemma_tokenizer`), which is the reference tests compare against. Its
scores are not used: Gemma's do not follow its merge order.

The rest is SentencePiece's conventions, as `tokenizers` objects:

- spaces become "▁" before BPE (a normalizer); no space is prepended (add_space_prefix false);
- characters without a token fall back to their UTF-8 bytes, tokens <0x00>..<0xFF>;
- decoding turns "▁" back into spaces and byte tokens back into characters;
- tokens of only whitespace are stored as real spaces ("  "), while the text they must match
  has been normalized to "▁▁": they are respelled so.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

SPACE = "\u2581"  # "▁", SentencePiece's visible space
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def respell(token: str) -> str:
    """A token made of whitespace with a space in it -> as many "▁" (see module docstring)."""
    return SPACE * len(token) if " " in token and not token.strip() else token


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens of `vocab`, ranked by the token's id, then by
    the longer left half first: the BPE merges a vocabulary in merge order implies."""
    merges = []
    for token in sorted(vocab, key=vocab.__getitem__):
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def gemma_backend(tokens: Sequence[str], types: Sequence[int], unk: str) -> BackendTokenizer:
    """The `tokenizers` pipeline of a Gemma GGUF (no BOS/EOS post-processor: the caller's)."""
    spelled = [respell(t) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError("GGUF vocabulary has duplicate tokens once whitespace is respelled")
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges_from_vocab(vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # control tokens (<bos>, <start_of_turn>...) are matched whole and are special; user-defined
    # ones ("\n\n", "\t") are matched whole before normalization, but are ordinary text
    control = [t for t, kind in zip(spelled, types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    user = [
        t
        for t, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_TYPE_USER_DEFINED and t in vocab
    ]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"GGUF vocabulary of {len(tokens)} tokens grew to "
            f"{backend.get_vocab_size(with_added_tokens=True)} when its special tokens were added"
        )
    return backend
