"""Sampling: SamplingParams (vLLM's names and meanings) and the Sampler that turns logits into tokens.

The order of work on one step's logits follows vLLM:

1. log-probabilities of the *raw* logits (what ``logprobs`` and ``cumulative_logprob`` report);
2. logits processors: ``min_tokens`` masks the stop tokens, then the repetition, frequency and
   presence penalties;
3. greedy rows take the argmax; random rows are divided by the temperature, cut by top-k, top-p
   and min-p, and drawn from the renormalised softmax with their own ``torch.Generator``.

Every filter keeps *all* tokens tied with the last one it keeps, so the kept set does not depend
on how a sort happens to order equal values.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# A temperature below this is treated as greedy (dividing by ~0 would overflow), as in vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # the OpenAI API's limit on top_logprobs
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class SamplingParamsTypeError(TypeError, ValueError):
    """A field of the wrong type. Also a ValueError, so servers that map ValueError to HTTP 400
    catch it with every other invalid sampling parameter."""


class RequestOutputKind(enum.Enum):
    """What each output of a running request carries (vLLM's names).

    CUMULATIVE: everything so far (text, token ids, logprobs), every step that advanced it.
    DELTA: only what is new since the request's previous output, for streaming.
    FINAL_ONLY: one output, when the request has finished (batch APIs, non-streamed replies).
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


class SamplingType(enum.Enum):
    GREEDY = "greedy"
    RANDOM = "random"  # drawn from torch's global generator
    RANDOM_SEED = "random_seed"  # drawn from the request's own seeded generator


# ---------------------------------------------------------------------------- SamplingParams
def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsTypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsTypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Field names and meanings follow vLLM.

    n: completions per prompt. temperature: 0 means greedy (argmax). top_k: keep the k most
    likely tokens (0 or -1: off). top_p: keep the smallest set of likely tokens whose mass
    reaches top_p (1: off). min_p: drop tokens less likely than min_p times the top token's
    probability (0: off). repetition_penalty: >1 discourages every token already in the prompt
    or output (1: off). presence_penalty / frequency_penalty: OpenAI's additive penalties over
    the output so far (0: off). seed: a per-request generator, so the same seed gives the same
    tokens. stop: strings that end the output (a str becomes a one-item list).
    stop_token_ids: token ids that end the output besides EOS. max_tokens: tokens to generate
    at most (None: until the context is full). min_tokens: EOS and stop tokens are masked until
    this many tokens exist. ignore_eos: keep going after EOS. logprobs: None, or how many top
    log-probabilities (0..20) to return per token besides the sampled one's.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.n = _integer("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        self.temperature = _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k}")
        self.min_p = _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1 (or None), got {self.max_tokens}")
        self.min_tokens = _integer("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}"
            )
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}"
                )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _flag(name, getattr(self, name))
        if not isinstance(self.output_kind, RequestOutputKind):
            try:
                self.output_kind = RequestOutputKind(self.output_kind)
            except ValueError:
                kinds = ", ".join(k.value for k in RequestOutputKind)
                raise ValueError(
                    f"output_kind must be one of {kinds}, got {self.output_kind!r}"
                ) from None

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list | tuple):
            raise SamplingParamsTypeError(
                f"stop must be a string or a list of strings, got {type(stop).__name__}"
            )
        for s in stop:
            if not isinstance(s, str):
                raise SamplingParamsTypeError(f"stop must hold strings, got {s!r}")
            if not s:
                raise ValueError("stop strings must not be empty")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, list | tuple):
            raise SamplingParamsTypeError(
                f"stop_token_ids must be a list of integers, got {type(ids).__name__}"
            )
        out = [_integer("stop_token_ids", t) for t in ids]
        if any(t < 0 for t in out):
            raise ValueError(f"stop_token_ids must be >= 0, got {out}")
        return out

    @classmethod
    def greedy(cls, **kwargs: object) -> SamplingParams:
        """Deterministic decoding: always the most likely token."""
        return cls(temperature=0.0, **kwargs)  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED


# ---------------------------------------------------------------------------- per-sequence state
@dataclass
class SamplingContext:
    """What the sampler needs to know about one sequence at this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


def make_generator(params: SamplingParams, index: int = 0) -> torch.Generator | None:
    """A CPU generator seeded from ``params.seed`` (None when unseeded).

    ``index`` picks a distinct, reproducible stream for the index-th of n completions; index 0
    uses the seed itself.
    """
    if params.seed is None:
        return None
    seed = params.seed % 2**64
    if index:
        seed = (seed + index * 0x9E3779B97F4A7C15) % 2**64  # golden-ratio stride: far apart
    return torch.Generator().manual_seed(seed)


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # log-probability of token_id under the raw logits
    top_logprobs: dict[int, float] | None  # None unless params.logprobs is set


# ---------------------------------------------------------------------------- filters
# Each filter takes logits [B, V] and one setting per row, and returns new logits with the
# removed tokens set to -inf. A row whose setting means "off" passes through unchanged.


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits / T per row: T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits / temperatures.to(logits.dtype).unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest in the row (k <= 0: off)."""
    vocab = logits.shape[1]
    k = top_k.clamp(max=vocab)
    if not bool((k > 0).any()):
        return logits
    # topk of the largest k asked for, not a full sort: 49k-wide sorts dominate a decode step
    largest = logits.topk(int(k.max()), dim=1).values
    kth = largest.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
    kth = torch.where((k > 0).unsqueeze(1), kth, torch.full_like(kth, -math.inf))
    return logits.masked_fill(logits < kth, -math.inf)


def _sorted_head(probs: torch.Tensor, top_p: torch.Tensor, head: int = 256) -> torch.Tensor:
    """The largest probabilities of each row in descending order, as many as top-p can need.

    If a row's `head` largest probabilities already add up to p, no token beyond them can be
    in the nucleus, so sorting those is exact; only rows whose nucleus is wider than `head`
    (very flat distributions) pay for a full sort of the vocabulary.
    """
    vocab = probs.shape[1]
    if vocab <= head:
        return probs.sort(dim=1, descending=True).values
    top = probs.topk(head, dim=1).values  # sorted, descending
    wide = top.sum(dim=1) < top_p.to(probs.dtype)
    if not bool(wide.any()):
        return top
    full = probs[wide].sort(dim=1, descending=True).values
    out = torch.zeros_like(probs)
    out[:, :head] = top
    out[wide] = full
    return out


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their mass reaches p (p >= 1: off).

    A token is kept when the mass of the tokens ranked above it is < p, so the first token is
    always kept; then every token tied with the least likely kept one is kept too.
    """
    active = top_p < 1
    if not bool(active.any()):
        return logits
    probs = logits.softmax(dim=1)
    sorted_probs = _sorted_head(probs, top_p)
    mass_above = sorted_probs.cumsum(dim=1) - sorted_probs
    num_kept = (mass_above < top_p.to(probs.dtype).unsqueeze(1)).sum(dim=1).clamp(min=1)
    threshold = sorted_probs.gather(1, (num_kept - 1).unsqueeze(1))
    threshold = torch.where(active.unsqueeze(1), threshold, torch.zeros_like(threshold))
    return logits.masked_fill(probs < threshold, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (the top token's probability) (min_p = 0: off).

    The ratio p_i / p_max = exp(l_i - l_max) does not change under renormalisation, so this
    needs no softmax and gives the same set before or after top-k.
    """
    active = min_p > 0
    if not bool(active.any()):
        return logits
    ratio = (logits - logits.max(dim=1, keepdim=True).values).exp()
    drop = (ratio < min_p.to(logits.dtype).unsqueeze(1)) & active.unsqueeze(1)
    return logits.masked_fill(drop, -math.inf)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties, one setting per row.

    Repetition (CTRL paper): every token seen in the prompt or output has its logit divided by
    the penalty when positive and multiplied by it when negative, so it always becomes less
    likely for a penalty > 1. Frequency and presence (OpenAI): over the *output* only,
    ``logit -= frequency * count + presence * (count > 0)``.
    """
    batch, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(batch, vocab, dtype=logits.dtype, device=device)
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for row, (prompt, output) in enumerate(zip(prompt_token_ids, output_token_ids, strict=True)):
        ids = list(prompt) + list(output)
        if ids and not 0 <= min(ids) <= max(ids) < vocab:
            raise ValueError(f"row {row} holds token ids outside [0, {vocab})")
        if output:
            out = torch.as_tensor(list(output), dtype=torch.long, device=device)
            counts[row].index_add_(
                0, out, torch.ones(len(output), dtype=logits.dtype, device=device)
            )
        if ids:
            seen[row, torch.as_tensor(ids, dtype=torch.long, device=device)] = True
    seen |= counts > 0
    rep = repetition_penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency_penalty.to(logits.dtype).unsqueeze(1) * counts
    return logits - presence_penalty.to(logits.dtype).unsqueeze(1) * (counts > 0).to(logits.dtype)


def stop_ids_to_mask(ctx: SamplingContext) -> set[int]:
    """Token ids that ``min_tokens`` forbids for this sequence right now (empty once satisfied).

    As in vLLM: the request's stop_token_ids, and EOS unless ignore_eos (EOS would not end the
    output then, so there is nothing to hold back).
    """
    p = ctx.params
    if len(ctx.output_token_ids) >= p.min_tokens:
        return set()
    ids = set(p.stop_token_ids or ())
    if not p.ignore_eos:
        ids |= set(ctx.eos_token_ids)
    return ids


# ---------------------------------------------------------------------------- the sampler
class Sampler:
    """Turns one step's logits [B, V] into one SampleResult per row."""

    def sample(
        self, logits: torch.Tensor, contexts: Sequence[SamplingContext]
    ) -> list[SampleResult]:
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
        if logits.shape[0] != len(contexts):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(contexts)} contexts")
        if not contexts:
            return []
        raw = logits.detach().float()  # read only: _process copies before it writes
        x = self._process(raw, contexts)
        tokens = self._choose(x, contexts)
        # log p(token) = logit - logsumexp(row): one pass per row, where a full log_softmax
        # wrote a vocab-sized row per sequence (at 16 sequences, a 3 MB tensor each step)
        return self._results(tokens, raw, torch.logsumexp(raw, dim=1), contexts)

    # -- step 2: processors
    def _process(self, x: torch.Tensor, contexts: Sequence[SamplingContext]) -> torch.Tensor:
        vocab, raw = x.shape[1], x
        for row, ctx in enumerate(contexts):
            banned = [t for t in stop_ids_to_mask(ctx) if 0 <= t < vocab]
            if banned:
                if len(banned) >= vocab:
                    raise ValueError("min_tokens would mask every token of the vocabulary")
                if x is raw:
                    x = x.clone()  # never write into the caller's logits
                x[row, banned] = -math.inf
        params = [c.params for c in contexts]
        if any(
            p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params
        ):
            x = apply_penalties(
                x,
                [c.prompt_token_ids for c in contexts],
                [c.output_token_ids for c in contexts],
                self._column(params, "repetition_penalty", x),
                self._column(params, "presence_penalty", x),
                self._column(params, "frequency_penalty", x),
            )
        return x

    # -- step 3: greedy or random choice
    def _choose(self, x: torch.Tensor, contexts: Sequence[SamplingContext]) -> list[int]:
        tokens = x.argmax(dim=1).tolist()
        rows = [i for i, c in enumerate(contexts) if not c.params.is_greedy]
        if not rows:
            return tokens
        params = [contexts[i].params for i in rows]
        probs = self.filtered_probs(x[rows], params)
        unseeded = [j for j, i in enumerate(rows) if contexts[i].generator is None]
        if unseeded:
            drawn = torch.multinomial(probs[unseeded], 1).squeeze(1).tolist()
            for j, tok in zip(unseeded, drawn, strict=True):
                tokens[rows[j]] = tok
        for j, i in enumerate(rows):
            gen = contexts[i].generator
            if gen is not None:
                row = probs[j].to(gen.device)
                tokens[i] = int(torch.multinomial(row, 1, generator=gen))
        return tokens

    def filtered_probs(self, x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution random rows are drawn from: temperature, top-k, top-p, min-p, softmax."""
        x = apply_temperature(x, self._column(params, "temperature", x))
        x = apply_top_k(x, torch.tensor([p.top_k for p in params], device=x.device))
        x = apply_top_p(x, self._column(params, "top_p", x))
        x = apply_min_p(x, self._column(params, "min_p", x))
        return x.softmax(dim=1)

    # -- step 1's numbers, reported
    @staticmethod
    def _results(
        tokens: list[int],
        raw: torch.Tensor,
        log_norm: torch.Tensor,
        contexts: Sequence[SamplingContext],
    ) -> list[SampleResult]:
        """Log-probabilities of the model's own distribution (before any processor), each
        logit minus its row's log_norm (logsumexp)."""
        chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None]).squeeze(1)
        chosen_list = (chosen - log_norm).tolist()
        results = []
        for row, (tok, ctx) in enumerate(zip(tokens, contexts, strict=True)):
            top: dict[int, float] | None = None
            k = ctx.params.logprobs
            if k is not None:
                top = {}
                if k:
                    values, ids = raw[row].topk(k)
                    top = dict(zip(ids.tolist(), (values - log_norm[row]).tolist(), strict=True))
                top.setdefault(tok, chosen_list[row])
            results.append(SampleResult(tok, chosen_list[row], top))
        return results

    @staticmethod
    def _column(params: Sequence[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(
            [getattr(p, name) for p in params], dtype=like.dtype, device=like.device
        )
