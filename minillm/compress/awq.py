"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), the scale search.

Observation: a few input channels of each linear layer carry much larger activations than the
rest, and the weights that multiply them matter most. Rounding error on those weights is
amplified by the big activations. AWQ protects them without mixed precision: scale column j
of W up by s_j and the input x_j down by s_j. The product is unchanged,

    W x = (W diag(s)) (diag(s)^-1 x),

but after quantization the scaled-up columns lose relatively less to rounding (their group's
step size is set mostly by other, smaller columns). The scales come from the activations:
s = mean|x|^alpha, normalised, with alpha picked per layer from a grid by the error it
actually produces on calibration inputs,

    err(alpha) = || Q(W diag(s)) (x / s) - W x ||^2.

alpha = 0 is plain round-to-nearest (RTN), so the search never does worse than RTN on its
calibration data. The 1/s on the input is folded into whatever produced that input, so the
result is an ordinary model with no extra op:

- q/k/v and gate/up read an RMSNorm output: divide the norm's weight by s;
- o reads the attention output, a mix of v rows: divide v's output rows by s. With grouped-
  query attention one v row feeds several query heads, so o's scales are tied across the
  query heads of a KV group (llm-awq skips o when the shapes differ; tying keeps it exact);
- down reads silu(gate) * up: divide up's output rows by s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from minillm.compress.calibration import Activations, capture_activations
from minillm.compress.fp32 import as_fp32 as _q
from minillm.compress.fp32 import as_torch as _t
from minillm.compress.int_quant import fake_quantize_int4
from minillm.config import ModelConfig
from minillm.model.weights import ModelWeights

Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScaleSearch:
    layer: int
    group: str  # "qkv", "o", "gate_up", "down"
    alpha: float  # the exponent picked (0 = plain RTN)
    rtn_error: float  # mean squared output error of plain RTN on the calibration inputs
    error: float  # the same error with the chosen scales


@dataclass
class AWQResult:
    weights: ModelWeights  # fp32, scales folded in, not yet quantized
    searches: list[ScaleSearch] = field(default_factory=list)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, divided by sqrt(max * min) so that the scales straddle 1."""
    s = x_mean.clamp(min=1e-8).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    quantizer: Quantizer,
    reference: torch.Tensor | None = None,
) -> float:
    """mean || Q(W diag(s)) (x / s) - W x ||^2 over tokens and outputs."""
    ref = x @ w.T if reference is None else reference
    out = (x / s) @ quantizer(w * s).T
    return float((out - ref).pow(2).mean())


def search_scale(
    x: torch.Tensor,
    w: torch.Tensor,
    quantizer: Quantizer,
    n_grid: int = 20,
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
    x_mean: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, float, float]:
    """Best alpha in {0, 1/n, ..., (n-1)/n} for input x (N, in) and weight w (out, in).

    `expand` maps a smaller scale vector to the `in` channels (tied scales, e.g. GQA);
    `x_mean` is then the statistic in the small space. Returns (alpha, s, error, rtn_error).
    """
    expand = expand or (lambda s: s)
    stat = x.abs().mean(0) if x_mean is None else x_mean
    reference = x @ w.T
    best = (0.0, torch.ones_like(stat), float("inf"))
    rtn_error = float("nan")
    for i in range(n_grid):
        alpha = i / n_grid
        s = awq_scales(stat, alpha)
        err = output_error(x, w, expand(s), quantizer, reference)
        if i == 0:
            rtn_error = err
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], rtn_error


def awq_scale_model(
    config: ModelConfig,
    weights: ModelWeights,
    calibration: list[int],
    group_size: int = 32,
    n_grid: int = 20,
    search_tokens: int = 256,
    activations: Activations | None = None,
) -> AWQResult:
    """Search and fold AWQ scales into every layer (fp32 out; quantize it afterwards).

    Statistics (mean |x|) use all calibration tokens; the error of each alpha is measured on
    `search_tokens` of them, evenly spaced, to bound the cost.
    """
    weights.require_dense("AWQ")
    acts = activations or capture_activations(config, weights, calibration)
    quantizer: Quantizer = lambda w: fake_quantize_int4(w, group_size)  # noqa: E731
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    per_group = heads // kv_heads

    def expand_kv(s: torch.Tensor) -> torch.Tensor:
        # v channel (kv, i) feeds o's input channels (h, i) for the heads h of KV group kv
        return s.reshape(kv_heads, 1, d).expand(kv_heads, per_group, d).reshape(-1)

    result = AWQResult(weights)
    layers = []
    for i, lw in enumerate(weights.layers):
        w = {f: _t(getattr(lw, f)) for f in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
        attn_norm, ffn_norm = _t(lw.attn_norm), _t(lw.ffn_norm)
        bv = None if lw.bv is None else _t(lw.bv)

        def sample(kind: str, layer: int = i) -> torch.Tensor:
            x = acts.inputs[(layer, kind)]
            idx = torch.linspace(0, len(x) - 1, min(search_tokens, len(x))).round().long()
            return x[idx]

        # q, k, v share the attention norm's output
        qkv = torch.cat([w["wq"], w["wk"], w["wv"]])
        alpha, s, err, rtn = search_scale(
            sample("attn_in"), qkv, quantizer, n_grid, x_mean=acts.mean_abs(i, "attn_in")
        )
        attn_norm = attn_norm / s
        for f in ("wq", "wk", "wv"):
            w[f] = w[f] * s
        result.searches.append(ScaleSearch(i, "qkv", alpha, rtn, err))

        # o reads the attention output; its scales are v's output rows, tied across each group
        o_stat = acts.mean_abs(i, "o_in").reshape(kv_heads, per_group, d).mean(1).reshape(-1)
        alpha, s, err, rtn = search_scale(
            sample("o_in"), w["wo"], quantizer, n_grid, expand=expand_kv, x_mean=o_stat
        )
        w["wv"] = w["wv"] / s[:, None]
        bv = None if bv is None else bv / s
        w["wo"] = w["wo"] * expand_kv(s)
        result.searches.append(ScaleSearch(i, "o", alpha, rtn, err))

        # gate and up share the FFN norm's output
        gate_up = torch.cat([w["w_gate"], w["w_up"]])
        alpha, s, err, rtn = search_scale(
            sample("mlp_in"), gate_up, quantizer, n_grid, x_mean=acts.mean_abs(i, "mlp_in")
        )
        ffn_norm = ffn_norm / s
        w["w_gate"], w["w_up"] = w["w_gate"] * s, w["w_up"] * s
        result.searches.append(ScaleSearch(i, "gate_up", alpha, rtn, err))

        # down reads silu(gate) * up: fold 1/s into up's output rows
        alpha, s, err, rtn = search_scale(
            sample("down_in"), w["w_down"], quantizer, n_grid, x_mean=acts.mean_abs(i, "down_in")
        )
        w["w_up"] = w["w_up"] / s[:, None]
        w["w_down"] = w["w_down"] * s
        result.searches.append(ScaleSearch(i, "down", alpha, rtn, err))

        layers.append(replace(
            lw, attn_norm=_q(attn_norm), ffn_norm=_q(ffn_norm),
            bv=None if bv is None else _q(bv), **{f: _q(t) for f, t in w.items()},
        ))  # fmt: skip
    result.weights = ModelWeights(weights.embed, layers, weights.final_norm, weights.lm_head)
    return result
