"""LLMEngine: add_request / step / abort_request, the one loop behind every entry point.

``LLM.generate`` (offline) and the async server both drive ``step()``: schedule, run the model
once on the flattened batch, sample, append, detokenize, check stop conditions, retire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from minillm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minillm.engine.runner import ModelRunner
from minillm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.kv.block_manager import BlockManager
from minillm.kv.cache import KVCache, parse_size
from minillm.model.llama import LlamaModel
from minillm.sampling import Sampler, SamplingContext, SamplingParams, make_generator
from minillm.tokenizer import IncrementalDetokenizer, Tokenizer


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


@dataclass
class EngineStats:
    """Monotonic counters (the server exports them as Prometheus metrics)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: dict[str, int] = field(default_factory=dict)


class _Request:
    """Engine-side bookkeeping of one request: its sequences, texts and timings."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        seq: Sequence,
        arrival: float,
    ) -> None:
        self.request_id, self.prompt, self.prompt_ids, self.params = (
            request_id,
            prompt,
            prompt_ids,
            params,
        )
        self.seqs = [seq]
        self.forked = params.n == 1
        self.texts: dict[int, str] = {0: ""}
        self.detoks: dict[int, IncrementalDetokenizer] = {}
        self.metrics = RequestMetrics(arrival, num_prompt_tokens=len(prompt_ids))

    @property
    def finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        mc = model.config
        per_block = KVCache.bytes_per_block(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim
        )
        num_blocks = config.num_kv_blocks or parse_size(config.kv_cache_memory) // per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory={config.kv_cache_memory!r} holds {num_blocks} "
                f"blocks of {per_block} bytes; need at least 2"
            )
        capacity = num_blocks * config.block_size
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
        self.kv_cache = KVCache(
            mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
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
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.last_scheduled: ScheduledBatch | None = None
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)

    # ------------------------------------------------------------------ requests
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
        if not ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is "
                f"{self.max_model_len}: it leaves no room to generate"
            )
        seq = Sequence(request_id, list(ids), len(ids), params, make_generator(params))
        self.scheduler.add(seq)
        req = _Request(
            request_id,
            text,
            list(ids),
            params,
            seq,
            time.perf_counter() if arrival_time is None else arrival_time,
        )
        req.detoks[seq.seq_id] = self._detokenizer(ids, params)
        self.requests[request_id] = req
        self.stats.prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks at once; returns its final (aborted) output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        req.forked = True
        req.metrics.finished_time = time.perf_counter()
        self._count_finished("abort")
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One scheduling decision and one forward pass; outputs of the requests it advanced."""
        sched = self.scheduler.schedule()
        self.last_scheduled = sched  # for teaching views (scheduler timeline) and tests
        if not sched.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError(
                    "the scheduler cannot admit the next waiting request even "
                    "with an empty batch; this is a bug, please report it"
                )
            return []
        now = time.perf_counter()
        for seq in sched.seqs:
            m = self.requests[seq.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        logits, to_sample = self.runner.execute(sched)
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)

        rows, seqs = [], []
        for row, seq in enumerate(to_sample):
            for s in self._fork_if_needed(seq):
                rows.append(row)
                seqs.append(s)
        touched: dict[str, _Request] = {}
        if seqs:
            contexts = [
                SamplingContext(
                    s.params,
                    s.prompt_token_ids,
                    s.output_token_ids,
                    s.generator,
                    self.eos_token_ids,
                )
                for s in seqs
            ]
            results = self.sampler.sample(logits[torch.tensor(rows)], contexts)
            now = time.perf_counter()
            for seq, res in zip(seqs, results, strict=True):
                req = self.requests[seq.request_id]
                if req.metrics.first_token_time is None:
                    req.metrics.first_token_time = now
                self._append(req, seq, res)
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = time.perf_counter()
                del self.requests[req.request_id]
                self._count_finished(*(s.finish_reason for s in req.seqs))
            outputs.append(self._output(req))
        return outputs

    # ------------------------------------------------------------------ helpers
    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )

    def _fork_if_needed(self, seq: Sequence) -> list[Sequence]:
        """At a request's first sample with n > 1, split it into n sequences sharing blocks."""
        req = self.requests[seq.request_id]
        if req.forked:
            return [seq]
        req.forked = True
        seqs = [seq]
        for i in range(1, seq.params.n):
            child = seq.fork(i, make_generator(seq.params, index=i))
            self.block_manager.fork(seq, child)
            self.scheduler.running.insert(self.scheduler.running.index(seq) + i, child)
            req.seqs.append(child)
            req.texts[i] = ""
            req.detoks[child.seq_id] = self._detokenizer(req.prompt_ids, seq.params)
            seqs.append(child)
        return seqs

    def _append(self, req: _Request, seq: Sequence, res: object) -> None:
        p = seq.params
        tok = int(res.token_id)
        seq.token_ids.append(tok)
        seq.cumulative_logprob += float(res.logprob)
        if p.logprobs is not None:
            seq.logprobs.append(res.top_logprobs or {tok: float(res.logprob)})
        self.stats.generation_tokens += 1
        req.metrics.num_generation_tokens += 1
        old = req.texts[seq.index]
        text = old + req.detoks[seq.seq_id].add(tok)
        n_out = seq.num_output_tokens
        status = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif p.stop_token_ids and tok in p.stop_token_ids:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, tok
            elif p.stop:
                text, hit = _find_stop(text, len(old), p.stop, p.include_stop_str_in_output)
                if hit is not None:
                    status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, hit
        if status is None and p.max_tokens is not None and n_out >= p.max_tokens:
            status = SequenceStatus.FINISHED_LENGTH
        if status is None and seq.num_tokens >= self.max_model_len:
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if seq.stop_reason is None or isinstance(seq.stop_reason, int):
                text += req.detoks[seq.seq_id].flush()
            self.scheduler.finish(seq, status)
        req.texts[seq.index] = text
        if seq.index == 0 and req.metrics.num_cached_tokens == 0:
            req.metrics.num_cached_tokens = seq.num_cached_tokens

    def _visible_text(self, req: _Request, seq: Sequence) -> str:
        """While running, hold back a tail that could still become a stop string."""
        text = req.texts[seq.index]
        if seq.is_finished or not seq.params.stop:
            return text
        hold = max(len(s) for s in seq.params.stop) - 1
        return text[: max(len(text) - hold, 0)]

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=self._visible_text(req, seq),
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                )
            )
        return RequestOutput(
            req.request_id, req.prompt, req.prompt_ids, outs, req.finished, req.metrics
        )

    def _count_finished(self, *reasons: str | None) -> None:
        reason = next((r for r in reasons if r), "abort")
        self.stats.finished_requests[reason] = self.stats.finished_requests.get(reason, 0) + 1


def _find_stop(text: str, old_len: int, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Earliest stop string that the new text completes; text cut before (or after) it."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, old_len - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s)] if include else text[:i], s
