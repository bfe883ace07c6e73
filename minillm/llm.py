"""LLM: the offline entry point, shaped like vLLM's (`generate`, `chat`) plus `stream`."""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from minillm.engine.llm_engine import EngineConfig, LLMEngine
from minillm.engine.outputs import RequestOutput
from minillm.loader import load_model
from minillm.sampling import RequestOutputKind, SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """Load a model once and run batches of prompts through one continuous-batching engine.

    >>> llm = LLM("smollm2")
    >>> llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=8))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str = "smollm2",
        *,
        backend: str = "auto",
        block_size: int = 16,
        kv_cache_memory: str | int = "256MiB",
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        num_micro_batches: int | None = None,
        enable_expert_parallel: bool = False,
        activations: str | None = None,
    ) -> None:
        """tensor_parallel_size x pipeline_parallel_size > 1: split the model over that many
        processes (minillm/parallel/): Megatron-style tensor parallelism within a stage,
        contiguous layer stages across them; num_micro_batches: how many pieces a pipelined
        step's batch is cut into (default: one per stage). kv_cache_memory is then per rank.
        enable_expert_parallel (an MoE model): split whole experts over the TP ranks, tokens
        sent to them by all-to-all (parallel/ep_moe.py), instead of slicing every expert.
        Such an LLM holds worker processes: close() it (or use `with LLM(...) as llm:`).
        activations: what the cpu backend's matmuls do with their input: "int8" (the default
        for quantized weights: W4A8, llama.cpp's way) or "fp32" (exact fp32 arithmetic)."""
        for name, size in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("pipeline_parallel_size", pipeline_parallel_size),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        self._close = lambda: None
        self.executor = None  # minillm.parallel.executor.ParallelExecutor when distributed
        if tensor_parallel_size * pipeline_parallel_size == 1:  # nothing distributed imported
            self.loaded = load_model(model, backend, activations=activations)
            if enable_expert_parallel is True and self.loaded.config.moe is None:
                raise ValueError(
                    "enable_expert_parallel=True needs a mixture-of-experts model, but this "
                    f"{self.loaded.config.arch} model is dense; drop enable_expert_parallel"
                )
        else:
            from minillm.parallel.config import ParallelConfig
            from minillm.parallel.executor import start_parallel

            parallel = ParallelConfig(
                tensor_parallel_size,
                pipeline_parallel_size,
                num_micro_batches,
                enable_expert_parallel,
                activations,
            )
            self.loaded, executor = start_parallel(model, backend, parallel)
            self.executor = executor
            # workers stop on close(), on garbage collection, or at interpreter exit
            self._close = weakref.finalize(self, executor.shutdown)
        try:
            self.engine = LLMEngine(
                self.loaded.model,
                self.loaded.tokenizer,
                EngineConfig(
                    block_size=block_size,
                    kv_cache_memory=kv_cache_memory,
                    num_kv_blocks=num_kv_blocks,
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    max_model_len=max_model_len,
                    enable_prefix_caching=enable_prefix_caching,
                    enable_chunked_prefill=enable_chunked_prefill,
                    # a parallel worker allocates one array per layer: no shared KV groups
                    free_out_of_window=self.executor is None,
                ),
            )
            if self.executor is not None:
                self.executor.attach(self.engine)
        except BaseException:
            self._close()
            raise
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the parallel workers, if any (idempotent; a no-op for one process)."""
        self._close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):  # noqa: ANN201 - minillm.tokenizer.Tokenizer
        return self.loaded.tokenizer

    @property
    def config(self):  # noqa: ANN201 - minillm.config.ModelConfig
        return self.loaded.config

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        return self.loaded.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ batch APIs
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (batched); outputs in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = [
            _with_kind(p, RequestOutputKind.FINAL_ONLY)
            for p in self._params_list(sampling_params, len(prompts))
        ]
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [finished[r] for r in ids]

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Like generate, for conversations: each goes through the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.apply_chat_template(c) for c in convs], sampling_params)

    def stream(
        self, prompt: str | Messages, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield one request's output as it grows, in DELTA mode (only the new text/tokens)."""
        text = prompt if isinstance(prompt, str) else self.apply_chat_template(prompt)
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() supports n=1; use generate() for n > 1")
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, text, _with_kind(params, RequestOutputKind.DELTA))
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)

    @staticmethod
    def _params_list(
        params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)


def _with_kind(params: SamplingParams, kind: RequestOutputKind) -> SamplingParams:
    """The caller's params with the output kind this API needs (the caller's object untouched)."""
    return params if params.output_kind is kind else dataclasses.replace(params, output_kind=kind)
