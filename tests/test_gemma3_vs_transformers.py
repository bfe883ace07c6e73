"""Gemma 3 270M against transformers on the same GGUF (transformers reads it with
`gguf_file=` and dequantizes it to fp32): tokenizer, logits, greedy tokens, past the window.

Loading it costs about 1 GB and some seconds, so the module loads it once.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from minillm import LLM, SamplingParams
from minillm.kv.cache import KVCache
from minillm.loader import load_model
from minillm.model.batch import ForwardBatch, PrefillChunk

PROMPTS = {
    "english": "The capital of France is",
    "chinese": "北京是中国的",
    "code": "def fibonacci(n):\n",
}
NEW_TOKENS = 16

CORPUS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "北京是中国的首都，也是中国最著名的城市之一。",
    "大语言模型的推理引擎：分页注意力、连续批处理。",
    "日本語のテキストと한국어 텍스트, and Ελληνικά, русский текст.",
    "def f(x):\n    return x  + 1\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++\n#include <vector>",
    "emoji: 🙂👍🏽 🇫🇷 👨‍👩‍👧 ✨ and a lone 🦜",
    "numbers 3.14159, 1,000,000 and 2024-12-05T04:19:00Z; 0x1F, 1e-6",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "special tokens in text: <start_of_turn>user\nhi<end_of_turn>\n<bos> <eos>",
    "tabs\tand\r\nwindows newlines\u00a0nbsp\u200bzero-width",
    "mixed 中英文 text with 数字123 and symbols ©®™ ∑∫√ ≠ ≤",
    "",
    " ",
    "a" * 300 + " " + "的" * 50,
]


@pytest.fixture(scope="module")
def hf(gemma3_gguf_path):
    folder, name = str(gemma3_gguf_path.parent), gemma3_gguf_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(gemma3_gguf_path):
    return load_model(gemma3_gguf_path, "ref")


def test_tokenizer_equals_transformers(hf, ours):
    hf_tok, _ = hf
    tok = ours.tokenizer
    for text in CORPUS:
        want = hf_tok(text)["input_ids"]
        assert tok.encode(text) == want, text
        assert want[:1] == [tok.bos_token_id] == [2]  # the GGUF says add_bos_token
        assert tok.encode(text, add_special_tokens=False) == want[1:], text
        assert tok.decode(want) == hf_tok.decode(want), text
        assert tok.decode(want, skip_special_tokens=True) == hf_tok.decode(
            want, skip_special_tokens=True
        )
    assert tok.vocab_size == len(hf_tok) == 262144
    assert tok.eos_token_id == hf_tok.eos_token_id == 1


def _hf_greedy(model: transformers.PreTrainedModel, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_greedy_tokens_and_logits_match_transformers(hf, ours, gemma3_gguf_path, backend):
    hf_tok, model = hf
    # fp32 activations on cpu: HF's fp32 arithmetic is the reference (int8: test_kernels_a8)
    llm = LLM(str(gemma3_gguf_path), backend=backend, activations="fp32")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for kind, prompt in PROMPTS.items():
        ids = hf_tok(prompt)["input_ids"]
        want = _hf_greedy(model, ids)
        got = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert got == want, (kind, hf_tok.decode(got), hf_tok.decode(want))
        # and the logits along that continuation, every position, against HF's
        full = ids + want
        with torch.no_grad():
            expected = model(torch.tensor([full])).logits[0]
        logits = _all_logits(ours.model if backend == "ref" else llm.loaded.model, full)
        assert expected.abs().max() > 10
        assert (logits - expected).abs().max().item() < 2e-3, kind
    if backend == "ref":  # the answer the issue quotes
        text = llm.generate([PROMPTS["chinese"]], params)[0].outputs[0].text
        assert text.startswith("首都，也是中国最著名的城市之一。")


def _all_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """(T, V) logits of one short sequence, prefilled at once through a paged cache."""
    cfg, t, bs = model.config, len(ids), 16
    kv = KVCache(cfg.num_layers, -(-t // bs), bs, cfg.num_kv_heads, cfg.head_dim)
    pos = torch.arange(t)
    batch = ForwardBatch(
        torch.tensor(ids), pos, pos, 0, torch.zeros(0, 0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long), [PrefillChunk(0, t, t, torch.arange(-(-t // bs)))],
        pos,
    )  # fmt: skip
    return model.forward(batch, kv.k, kv.v)


def test_past_the_sliding_window_matches_transformers(hf, gemma3_gguf_path):
    """A 700-token prompt: the local layers' windows (512) cut in. Chunked prefill and decode
    on cpu give HF's greedy tokens, and the last prompt position's logits agree."""
    hf_tok, model = hf
    text = " ".join(f"Note {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 13}."
                    for i in range(50))  # fmt: skip
    ids = hf_tok(text)["input_ids"]
    assert 600 < len(ids) < 900
    with torch.no_grad():
        expected = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    want = _hf_greedy(model, ids)
    llm = LLM(str(gemma3_gguf_path), backend="cpu", max_num_batched_tokens=256, activations="fp32")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    out = llm.generate([ids], params)[0].outputs[0]
    assert out.token_ids == want
    top = torch.log_softmax(expected, -1).topk(5)
    first = out.logprobs[0]  # the first new token's top-5, computed from the prompt's last row
    assert sorted(first) == sorted(top.indices.tolist())
    for token_id, logprob in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        assert abs(first[token_id] - logprob) < 2e-3
