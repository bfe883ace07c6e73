"""The forward pass against Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from minillm import LLM, SamplingParams
from minillm.config import ModelConfig
from minillm.kernels import get_backend
from minillm.model.llama import LlamaModel
from minillm.model.weights import load_hf_weights, unpermute_rows
from minillm.testing import make_tiny_model, prefill_logits


@pytest.mark.parametrize(
    "arch,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)]
)
def test_tiny_random_logits_match(tmp_path, arch, tied):
    path = make_tiny_model(tmp_path / arch, arch, seed=3, tie_word_embeddings=tied)
    cfg = ModelConfig.from_hf_config(path / "config.json")
    assert cfg.attention_bias == (arch == "qwen2") and cfg.tie_word_embeddings == tied
    ours = LlamaModel(cfg, load_hf_weights(path, cfg), get_backend("ref"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [(13 * i) % cfg.vocab_size for i in range(1, 60)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = prefill_logits(ours, ids)
    assert (got - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 0.1  # a real signal, not two zeros agreeing


def test_tiny_greedy_generation_matches_hf(tmp_path):
    path = make_tiny_model(tmp_path / "g", "qwen2", seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), backend="ref", block_size=4)
    for prompt in ([5, 9, 11], [7] * 13, list(range(20, 45))):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16
            )[0, len(prompt) :].tolist()
        got = (
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
            .outputs[0]
            .token_ids
        )
        assert got == ref


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim = 3, 8
    w = torch.arange(n_head * head_dim)
    # llama.cpp's convert: reshape(n_head, 2, hd/2).swapaxes(1, 2) interleaves the two halves
    permuted = w.reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(permuted[unpermute_rows(n_head * head_dim, n_head)], w)


# ----------------------------------------------------------------------------- bundled GGUF
PROMPTS = [
    "What is a KV cache?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "用一句话介绍你自己。",
]


@pytest.fixture(scope="module")
def hf_bundled(bundled_gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        bundled_gguf_path.parent, gguf_file=bundled_gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def llm_bundled(bundled_gguf_path):
    return LLM(str(bundled_gguf_path), backend="ref")


def test_bundled_logits_close(hf_bundled, llm_bundled):
    ids = llm_bundled.tokenizer.encode(
        llm_bundled.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    )
    with torch.no_grad():
        ref = hf_bundled(torch.tensor([ids])).logits[0]
    got = prefill_logits(llm_bundled.loaded.model, ids, block_size=16)
    # fp32 on both sides, same dequantized weights; differences are summation order only
    assert (got - ref).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_bundled_greedy_32_tokens_identical(hf_bundled, llm_bundled):
    texts = [llm_bundled.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    ids = [llm_bundled.tokenizer.encode(t) for t in texts]
    outs = llm_bundled.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt_ids, out in zip(ids, outs, strict=True):
        with torch.no_grad():
            ref = hf_bundled.generate(
                torch.tensor([prompt_ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False
            )[0, len(prompt_ids) :]
        assert out.outputs[0].token_ids == ref.tolist()
