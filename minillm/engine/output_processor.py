"""The output processor: sampled tokens -> text -> RequestOutputs, in the kind each caller asked.

One home for what every consumer needs (vLLM's OutputProcessor): incremental detokenization,
stop strings (which need text, so the scheduler cannot judge them), holding back a tail that
could still become a stop string, request timings, and the output kind chosen once per request
(``SamplingParams.output_kind``): everything so far (CUMULATIVE), only what is new (DELTA, for
streams) or one final output (FINAL_ONLY, for batch calls). No consumer re-derives deltas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from minillm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.sampling import RequestOutputKind, SamplingParams
from minillm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class EngineStats:
    """Monotonic counters (the server exports them as Prometheus metrics)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: dict[str, int] = field(default_factory=dict)

    def count_finished(self, reason: str) -> None:
        self.finished_requests[reason] = self.finished_requests.get(reason, 0) + 1


@dataclass
class _Completion:
    """One completion's text so far, its detokenizer, and how much of it was already sent."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_final: bool = False


class RequestState:
    """A request as its caller sees it: prompt, params, timings and its n completions."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival: float,
    ) -> None:
        self.request_id, self.prompt, self.prompt_ids = request_id, prompt, prompt_ids
        self.params = params
        self.metrics = RequestMetrics(arrival, num_prompt_tokens=len(prompt_ids))
        self.completions: dict[int, _Completion] = {}
        self.aborted = False

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.completions.values()]

    @property
    def finished(self) -> bool:
        """All n completions exist (n > 1 forks at the first sample) and have ended."""
        done = all(c.seq.is_finished for c in self.completions.values())
        return self.aborted or (done and len(self.completions) == self.params.n)


class OutputProcessor:
    """Turns the sequences the scheduler updated into the RequestOutputs of their requests.

    ``finish(seq, status)`` retires a sequence (the scheduler's ``finish``): a stop string ends
    a sequence from here.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        finish: Callable[[Sequence, SequenceStatus], None],
        stats: EngineStats | None = None,
    ) -> None:
        self.tokenizer, self.finish = tokenizer, finish
        self.stats = stats or EngineStats()
        self.requests: dict[str, RequestState] = {}

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        seq: Sequence,
        arrival: float,
    ) -> None:
        state = RequestState(request_id, prompt, list(seq.prompt_token_ids), seq.params, arrival)
        self._track(state, seq)
        self.requests[request_id] = state
        self.stats.prompt_tokens += len(state.prompt_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now: its live sequences are retired, and its final output returned."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        state.aborted = True
        state.metrics.finished_time = time.perf_counter()
        self.stats.count_finished("abort")
        return self._output(state, state.params.output_kind)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ one step
    def process(self, updated: list[Sequence]) -> list[RequestOutput]:
        """Detokenize each new token, apply stop strings, and build the outputs of this step."""
        now = time.perf_counter()
        touched: dict[str, RequestState] = {}
        for seq in updated:
            state = self.requests.get(seq.request_id)
            if state is None:  # aborted while the step ran
                continue
            comp = state.completions.get(seq.index) or self._track(state, seq)
            self._add_text(comp, seq)
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.first_scheduled_time = seq.first_scheduled_time
                m.num_cached_tokens = seq.num_cached_tokens
            m.num_generation_tokens += 1
            if seq.index == 0:
                m.token_times.append(now)
            self.stats.generation_tokens += 1
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = time.perf_counter()
                del self.requests[state.request_id]
                reasons = [s.finish_reason for s in state.seqs if s.finish_reason]
                self.stats.count_finished(reasons[0] if reasons else "abort")
            out = self._output(state, state.params.output_kind)
            if out is not None:
                outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ helpers
    def _track(self, state: RequestState, seq: Sequence) -> _Completion:
        detok = IncrementalDetokenizer(
            self.tokenizer, state.prompt_ids, skip_special_tokens=state.params.skip_special_tokens
        )
        for tok in seq.output_token_ids[:-1]:  # a sibling's first token is added by the caller
            detok.add(tok)
        comp = _Completion(seq, detok)
        state.completions[seq.index] = comp
        return comp

    def _add_text(self, comp: _Completion, seq: Sequence) -> None:
        """Append the newest token's text; end the sequence on a stop string."""
        p = seq.params
        old = comp.text
        text = old + comp.detokenizer.add(seq.token_ids[-1])
        stoppable = seq.status in (SequenceStatus.RUNNING, SequenceStatus.FINISHED_LENGTH)
        if p.stop and stoppable and seq.num_output_tokens >= p.min_tokens:
            text, hit = find_stop(text, len(old), p.stop, p.include_stop_str_in_output)
            if hit is not None:
                seq.stop_reason = hit
                if seq.is_finished:  # max_tokens ended it on this very token: the stop wins
                    seq.status = SequenceStatus.FINISHED_STOPPED
                else:
                    self.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if seq.is_finished and not isinstance(seq.stop_reason, str):
            text += comp.detokenizer.flush()
        comp.text = text

    @staticmethod
    def _visible(comp: _Completion) -> str:
        """While running, hold back a tail that could still become a stop string."""
        seq, text = comp.seq, comp.text
        if seq.is_finished or not seq.params.stop:
            return text
        hold = max(len(s) for s in seq.params.stop) - 1
        return text[: max(len(text) - hold, 0)]

    def _output(self, state: RequestState, kind: RequestOutputKind) -> RequestOutput | None:
        """The request's output in `kind`; None when FINAL_ONLY and not finished yet."""
        finished = state.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        outs = []
        for index in sorted(state.completions):
            comp = state.completions[index]
            seq, text = comp.seq, self._visible(comp)
            visible_chars, ids, lps = len(text), seq.output_token_ids, seq.logprobs
            if delta:
                new_text, new_ids = text[comp.sent_chars :], ids[comp.sent_tokens :]
                ended = seq.is_finished and not comp.sent_final
                if not (new_text or new_ids or ended):
                    continue
                lps = lps[comp.sent_tokens :]
                text, ids = new_text, new_ids
            comp.sent_chars, comp.sent_tokens = visible_chars, seq.num_output_tokens
            comp.sent_final = seq.is_finished
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(lps) if seq.params.logprobs is not None else None,
                )
            )
        return RequestOutput(
            state.request_id, state.prompt, state.prompt_ids, outs, finished, state.metrics
        )


def find_stop(text: str, old_len: int, stops: list[str], include: bool) -> tuple[str, str | None]:
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
