"""A prompt computed elsewhere: what a prefill server hands a decode server (PD disaggregation).

vLLM's disaggregated demo runs the prompt on the prefill instance with ``max_tokens=1``, and
the decode instance continues from the transferred KV. The same here: the prefill engine runs
the request with `prefill_params` (one token; everything that shapes that first token kept),
and at the step where that token is sampled it exports a `PrefilledPrompt`: the token, its
log-probabilities, the sampler's generator state after the draw (so a seeded request continues
with the very numbers one colocated engine would draw), and the prompt's K/V. The decode engine
takes it with `LLMEngine.add_prefilled_request`. Moving it between machines is the server's
job (minillm/parallel/pd_transfer.py), not the engine's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minillm.sampling import RequestOutputKind, SamplingParams, make_generator


@dataclass
class PrefilledPrompt:
    """The prefill side's result for one request (one completion: n = 1).

    kv: float32 (2, num_layers, num_prompt_tokens, num_kv_heads, head_dim), K then V.
    generator_state: the request's torch.Generator state after the first draw (seeded
    requests only; None when sampling is greedy or unseeded).
    num_cached_tokens: prompt tokens the prefill server found in its prefix cache.
    """

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None
    generator_state: torch.Tensor | None
    num_cached_tokens: int
    kv: torch.Tensor

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.kv.shape[2])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def prefill_params(params: SamplingParams) -> SamplingParams:
    """The request as the prefill engine runs it: stop after the first token.

    Everything that decides the first token is kept (temperature, top-k/p, min-p, penalties,
    seed, logprobs, stop_token_ids and min_tokens, which masks EOS and stop tokens while no
    output exists yet); what only matters later is dropped."""
    if params.n != 1:
        raise ValueError(f"a disaggregated request must have n=1, got n={params.n}")
    return dataclasses.replace(
        params,
        max_tokens=1,
        min_tokens=min(params.min_tokens, 1),
        stop=None,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def restored_generator(
    params: SamplingParams, state: torch.Tensor | None
) -> torch.Generator | None:
    """The request's generator, moved on to where the prefill side's draw left it."""
    gen = make_generator(params)
    if gen is not None and state is not None:
        gen.set_state(state)
    return gen


def check_prefilled(prefilled: PrefilledPrompt, shape: tuple[int, ...]) -> None:
    """A clear error when the K/V does not fit this engine's model and prompt."""
    kv = prefilled.kv
    if kv.dtype != torch.float32 or tuple(kv.shape) != shape:
        raise ValueError(
            f"the prefilled K/V is {kv.dtype} {tuple(kv.shape)}, but this engine needs "
            f"torch.float32 {shape} (2, layers, prompt tokens, KV heads, head dim): "
            "the prefill server runs a different model"
        )
