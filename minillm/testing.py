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


def prefill_logits(model: Any, ids: list[int], block_size: int = 4) -> Any:
    """(len(ids), V) logits of one whole sequence, through a fresh paged KV cache: how tests
    compare a model's every position with a reference (transformers, one process)."""
    import torch

    from minillm.kv.cache import KVCache
    from minillm.model.batch import ForwardBatch, PrefillChunk

    cfg, t = model.config, len(ids)
    nblk = -(-t // block_size)
    kv = KVCache(cfg.num_layers, nblk + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
    table = list(range(1, nblk + 1))  # block 0 stays unused, as the engine's null block
    slots = [table[p // block_size] * block_size + p % block_size for p in range(t)]
    batch = ForwardBatch(
        torch.tensor(ids),
        torch.arange(t),
        torch.tensor(slots),
        0,
        torch.zeros(0, 0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        [PrefillChunk(0, t, t, torch.tensor(table))],
        torch.arange(t),
    )
    return model.forward(batch, kv.k, kv.v)


def make_tiny_moe_model(
    folder: str | Path,
    arch: str = "mixtral",
    num_experts: int = 4,
    top_k: int = 2,
    seed: int = 0,
    **config: Any,
) -> Path:
    """A 2-layer random mixture-of-experts model in HF format: Mixtral (renormalised top-k) or
    Qwen2-MoE (q/k/v bias, shared expert with a sigmoid gate, norm_topk_prob=False unless
    overridden). `config` overrides fields of the HF config (e.g. mlp_only_layers=[0])."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tiny_tokenizer(folder)
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        common.update(intermediate_size=96, num_local_experts=num_experts)
        common.update(config)
        cfg, cls = transformers.MixtralConfig(**common), transformers.MixtralForCausalLM
    elif arch == "qwen2_moe":
        common.update(
            intermediate_size=96,  # the dense FFN of layers in mlp_only_layers
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=num_experts,
            norm_topk_prob=False,
        )
        common.update(config)
        cfg, cls = transformers.Qwen2MoeConfig(**common), transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(f"unknown tiny MoE arch {arch!r}: use 'mixtral' or 'qwen2_moe'")
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():  # biases and norms away from their defaults; routers that pick
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight") and p.shape[0] in (num_experts, 1):
                p.normal_(0.0, 0.5)  # routers (and the shared gate): clear, varied choices
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


def spawned_children() -> set[int]:
    """This process's multiprocessing 'spawn' children, at any depth (the resource tracker is
    not one): what a parallel run starts and must stop. Needs psutil (a dev dependency)."""
    import psutil

    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@contextmanager
def no_leftover_workers() -> Iterator[None]:
    """Fail if the block leaves a spawned worker or an initialized torch.distributed group
    behind. Survivors are killed and the group destroyed before the check, so one failure does
    not spill into the next test."""
    import psutil
    import torch.distributed as dist

    before = spawned_children()
    try:
        yield
    finally:
        left = spawned_children() - before
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        initialized = dist.is_available() and dist.is_initialized()
        if initialized:
            dist.destroy_process_group()
    assert not left, f"worker processes left behind: {sorted(left)}"
    assert not initialized, "the torch.distributed process group was left initialized"


class HTTPProcess:
    """A command that serves HTTP (`minillm serve`, `minillm gateway`, torchrun ...) in a
    subprocess, with its output in a log file. Ready means GET /health answers 200: tests and
    benchmarks wait on that, never on time, and a process that exits while starting is
    reported with the tail of its log."""

    def __init__(
        self,
        args: list[str],
        url: str,
        log: str | Path,
        env: dict[str, str] | None = None,
    ) -> None:
        import os
        import subprocess

        self.url, self.log = url, Path(log)
        run_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=run_env)

    @classmethod
    def minillm(
        cls,
        command: str,
        *args: str,
        port: int,
        log: str | Path,
        env: dict[str, str] | None = None,
    ) -> HTTPProcess:
        """`python -m minillm.cli COMMAND ARGS --port PORT`, e.g. serve MODEL or gateway."""
        import sys

        cmd = [sys.executable, "-m", "minillm.cli", command, *args, "--port", str(port)]
        return cls(cmd, f"http://127.0.0.1:{port}", log, env)

    def output(self, chars: int | None = None) -> str:
        """The process's output so far (its last `chars` characters, if given)."""
        text = self.log.read_text(errors="replace")
        return text if chars is None else text[-chars:]

    def healthy(self) -> bool:
        """Whether /health answers 200 now; RuntimeError (with the log) if the process died."""
        import httpx

        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.url}: exited with {self.proc.returncode}:\n{self.output(3000)}"
            )
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> HTTPProcess:
        """Poll /health until it answers 200 (a generous deadline: a busy machine loads slowly)."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.url}: not ready within {timeout:.0f} s:\n{self.output(3000)}"
                )
            time.sleep(0.2)
        return self

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        return self.proc.returncode

    def __enter__(self) -> HTTPProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
