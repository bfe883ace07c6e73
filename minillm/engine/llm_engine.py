"""LLMEngine: add_request / step / abort_request, the one loop behind every entry point.

``LLM.generate`` (offline) and the async server both drive ``step()``, which reads like
nano-vllm's: the scheduler picks the batch, the runner runs the model once on it and the
sampler picks tokens, the scheduler books the results, and the output processor turns them into
text and outputs. Each job has one home; this file only wires them together.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillm.engine.output_processor import EngineStats, OutputProcessor, RequestState
from minillm.engine.outputs import RequestOutput
from minillm.engine.prefilled import (
    PrefilledPrompt,
    check_prefilled,
    prefill_params,
    restored_generator,
)
from minillm.engine.runner import ModelRunner
from minillm.engine.scheduler import SampledToken, ScheduledBatch, Scheduler, SchedulerConfig
from minillm.engine.sequence import Sequence
from minillm.kv.block_manager import BlockManager
from minillm.kv.cache import KVCache, parse_size
from minillm.kv.hybrid_block_manager import HybridBlockManager
from minillm.kv.layout import layout_for_windows, single_group
from minillm.model.llama import LlamaModel
from minillm.model.pooling import embed
from minillm.sampling import Sampler, SamplingContext, SamplingParams, make_generator
from minillm.tokenizer import Tokenizer

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "PromptError"]


class PromptError(ValueError):
    """A prompt (or the room it leaves) the engine cannot serve; `field` names what is wrong:
    "prompt" or "max_tokens"."""

    def __init__(self, message: str, field: str = "prompt") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: str | int = "256MiB"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # sliding-window layers (Gemma 3) get their own block tables and give back the blocks that
    # fell behind their window (kv/hybrid_block_manager.py); False: one table for every layer
    free_out_of_window: bool = True


class LLMEngine:
    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        mc = model.config
        windows = getattr(model, "layer_windows", None)
        layout = (
            layout_for_windows(windows)
            if windows and config.free_out_of_window
            else single_group(mc.num_layers)
        )
        per_block = KVCache.bytes_per_block(
            layout.page_layers, config.block_size, mc.num_kv_heads, mc.head_dim
        )
        num_blocks = config.num_kv_blocks or parse_size(config.kv_cache_memory) // per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory={config.kv_cache_memory!r} holds {num_blocks} "
                f"blocks of {per_block} bytes; need at least 2"
            )
        # a whole prompt computed in one step holds every group's blocks for all its tokens
        capacity = num_blocks // layout.num_groups * config.block_size
        max_len = config.max_model_len or min(mc.max_position_embeddings, capacity)
        if max_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}"
            )
        if max_len > capacity:  # one sequence alone must always fit, or it could never finish
            raise ValueError(
                f"max_model_len={max_len} needs more KV slots than the cache holds "
                f"({num_blocks} blocks x {config.block_size} = {capacity}); raise "
                "kv_cache_memory or lower max_model_len"
            )
        self.max_model_len = max_len
        # the backend allocates the cache where its kernels read it (host memory, or the GPU)
        self.kv_cache = KVCache(
            mc.num_layers,
            num_blocks,
            config.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            model.ops,
            layout,
        )
        self.block_manager = (
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
            if layout.num_groups == 1
            else HybridBlockManager(
                num_blocks, config.block_size, layout.group_windows, config.enable_prefix_caching
            )
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                max(config.max_num_batched_tokens, 1 if config.enable_chunked_prefill else max_len),
                max_len,
                config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler()
        self.stats = EngineStats()
        self.output_processor = OutputProcessor(tokenizer, self.scheduler.finish, self.stats)
        self.last_scheduled: ScheduledBatch | None = None
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        # prefill/decode disaggregation (engine/prefilled.py): requests whose K/V leave this
        # engine once their first token is sampled, and prompts computed elsewhere waiting
        # for blocks here
        self._prefill_sinks: dict[str, Callable[[PrefilledPrompt], None]] = {}
        self._prefilled: deque[tuple[Sequence, PrefilledPrompt]] = deque()

    # ------------------------------------------------------------------ requests
    @property
    def requests(self) -> dict[str, RequestState]:
        """The requests not finished yet, by id."""
        return self.output_processor.requests

    def check_prompt(
        self,
        ids: list[int],
        max_tokens: int | None = None,
        context_limit: int | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """The one check of a prompt: not empty, known token ids, room left to generate.

        max_tokens: also check that this many tokens fit after the prompt (servers refuse a
        request that could not get them, as vLLM does). context_limit: a lower context length
        than the engine's for this request (Ollama's num_ctx). num_tokens: the prompt's whole
        length when `ids` holds only its head (Tokenizer.count_and_head). Raises PromptError."""
        limit = min(self.max_model_len, context_limit or self.max_model_len)
        n = len(ids) if num_tokens is None else num_tokens
        if not n:
            raise PromptError("the prompt is empty: it must contain at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise PromptError(f"prompt token ids must be in [0, {vocab})")
        if n >= limit:
            raise PromptError(
                f"the prompt is {n} tokens long, but this model's context length is "
                f"{limit} tokens, which leaves no room to generate; shorten the prompt "
                "(or raise max_model_len)"
            )
        if max_tokens is not None and n + max_tokens > limit:
            raise PromptError(
                f"max_tokens={max_tokens} is too large: the prompt has {n} tokens and the "
                f"context length is {limit}, so at most {limit - n} can be generated",
                "max_tokens",
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self.check_prompt(ids)
        seq = Sequence(
            request_id,
            ids,
            len(ids),
            params,
            make_generator(params),
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        self.scheduler.add(seq)
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        self.output_processor.add_request(request_id, text, seq, arrival)

    def add_prefill_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_prefilled: Callable[[PrefilledPrompt], None],
    ) -> None:
        """The prefill side of a disaggregated pair: compute the prompt (batched, chunked and
        prefix-cached like any request), sample its first token, and call `on_prefilled` on
        this thread, inside the step, while the prompt's blocks are still held. The request
        then ends; its full blocks stay in the prefix cache for later prompts."""
        self.add_request(request_id, prompt_ids, prefill_params(params))
        self._prefill_sinks[request_id] = on_prefilled

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prefilled: PrefilledPrompt,
        arrival_time: float | None = None,
    ) -> None:
        """The decode side: a request whose prompt K/V and first token come from a prefill
        server. It waits until blocks are free, its K/V is written into them through the
        backend, and it decodes on from its first token as if this engine had prefilled it."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.n != 1:
            raise ValueError(f"a prefilled request must have n=1, got n={params.n}")
        ids = [int(t) for t in prompt_ids]
        self.check_prompt(ids)
        mc = self.model.config
        check_prefilled(prefilled, (2, mc.num_layers, len(ids), mc.num_kv_heads, mc.head_dim))
        seq = Sequence(
            request_id,
            ids,
            len(ids),
            params,
            restored_generator(params, prefilled.generator_state),
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        self.output_processor.add_request(request_id, None, seq, arrival)
        self._prefilled.append((seq, prefilled))

    def _admit_prefilled(self) -> list[Sequence]:
        """Give waiting prefilled prompts their blocks, write their K/V, append their first
        token; returns the sequences admitted (in arrival order, while room lasts)."""
        admitted: list[Sequence] = []
        bs = self.block_manager.block_size
        while self._prefilled:
            seq, pre = self._prefilled[0]
            if seq.is_finished:  # aborted while it waited
                self._prefilled.popleft()
                continue
            if not self.scheduler.admit_computed(seq):
                break
            self._prefilled.popleft()
            start, end = seq.num_computed_tokens, seq.num_tokens  # prefix hits are not rewritten
            slots = [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            self.kv_cache.write_slots(slots, pre.kv[:, :, start:end])
            seq.num_computed_tokens = end
            seq.num_cached_tokens = pre.num_cached_tokens
            self.block_manager.cache_full_blocks(seq)
            seq.append_token(pre.token_id, pre.logprob, pre.top_logprobs)
            status = seq.token_stop()
            if status is not None:
                self.scheduler.finish(seq, status)
            admitted.append(seq)
        return admitted

    def _export_prefilled(self, sampled: list[SampledToken]) -> None:
        """Hand each finished prefill's first token and prompt K/V to its sink."""
        bs = self.block_manager.block_size
        for s in sampled:
            sink = self._prefill_sinks.pop(s.seq.request_id, None)
            if sink is None:
                continue
            seq = s.seq
            slots = [seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_prompt_tokens)]
            gen = s.generator if s.generator is not None else seq.generator
            sink(
                PrefilledPrompt(
                    s.token_id,
                    s.logprob,
                    s.top_logprobs,
                    None if gen is None else gen.get_state(),
                    seq.num_cached_tokens,
                    self.kv_cache.read_slots(slots),
                )
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks at once; returns its final (aborted) output."""
        self._prefill_sinks.pop(request_id, None)
        return self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._prefilled)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised final hidden states of each input (model.pooling).

        Runs the model between steps, on a scratch cache: the engine's blocks are untouched."""
        for ids in inputs:
            if len(ids) > self.max_model_len:
                raise PromptError(
                    f"an input is {len(ids)} tokens long, but this model's context length "
                    f"is {self.max_model_len} tokens",
                    "input",
                )
        return [embed(self.model, ids) for ids in inputs]

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run, post-process; returns the outputs of the requests it advanced."""
        first = self.output_processor.process(self._admit_prefilled()) if self._prefilled else []
        batch = self.scheduler.schedule()
        self.last_scheduled = batch  # for teaching views (scheduler timeline) and tests
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError(
                    "the scheduler cannot admit the next waiting request even "
                    "with an empty batch; this is a bug, please report it"
                )
            return first
        logits, to_sample = self.runner.execute(batch)
        sampled = self._sample(logits, to_sample)
        if self._prefill_sinks:
            self._export_prefilled(sampled)
        updated = self.scheduler.update_from_output(batch, sampled)
        return first + self.output_processor.process(updated)

    def _sample(self, logits: torch.Tensor, to_sample: list[Sequence]) -> list[SampledToken]:
        """One token per sequence from its logits row; a request with n > 1 draws n tokens from
        its row at its first sample (each completion with its own generator), which forks it."""
        rows: list[int] = []
        contexts: list[SamplingContext] = []
        forks: list[tuple[Sequence, int, torch.Generator | None]] = []
        for row, seq in enumerate(to_sample):
            p = seq.params
            first_of_n = p.n > 1 and seq.index == 0 and seq.num_output_tokens == 0
            for i in range(p.n if first_of_n else 1):
                gen = seq.generator if i == 0 else make_generator(p, index=i)
                rows.append(row)
                contexts.append(
                    SamplingContext(
                        p, seq.prompt_token_ids, seq.output_token_ids, gen, seq.eos_token_ids
                    )
                )
                forks.append((seq, i, gen))
        if not rows:
            return []
        if rows != list(range(logits.shape[0])):  # n > 1 forks: rows repeat
            logits = logits[torch.tensor(rows)]
        results = self.sampler.sample(logits, contexts)
        return [
            SampledToken(seq, int(r.token_id), float(r.logprob), r.top_logprobs, i, gen)
            for (seq, i, gen), r in zip(forks, results, strict=True)
        ]
