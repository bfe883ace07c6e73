"""Tiny random models made on the fly, so tests never download anything.

`make_tiny_model(folder, arch)` writes a Hugging Face folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) with random weights from `transformers` itself, so the
same folder can be loaded by minillm and by transformers for comparison.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Large language models predict the next token.",
    "KV cache, paged attention, continuous batching and quantization.",
    "大模型推理部署 量化 剪枝 蒸馏",
] * 20


def make_tiny_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on a few sentences; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "chat_template": CHATML,
                "model_max_length": 256,
            }
        )
    )
    return tok.get_vocab_size()


def make_tiny_model(
    folder: str | Path,
    arch: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    **config: Any,
) -> Path:
    """A 2-layer random Llama or Qwen2 in HF format (GQA: 4 query heads, 2 KV heads).

    `config` overrides fields of the HF config, e.g. num_attention_heads=12 and
    num_key_value_heads=6 for a model that splits over 2 or 3 tensor-parallel ranks."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tiny_tokenizer(folder)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(config)
    if arch == "llama":
        tie = False if tie_word_embeddings is None else tie_word_embeddings
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=tie)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=tie)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():  # biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@contextmanager
def slowed_steps(engine: Any, seconds: float = 0.01) -> Iterator[None]:
    """Each `engine.step()` takes at least `seconds` longer inside the block.

    Tests use it so that a long request is certainly still running when the test acts on it
    (a client leaving, a bad request arriving): a lower bound on a step, never a wait on time.
    """
    real_step = engine.step

    def slow() -> list:
        time.sleep(seconds)
        return real_step()

    engine.step = slow
    try:
        yield
    finally:
        engine.step = real_step
