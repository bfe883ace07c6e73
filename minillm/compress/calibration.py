"""Calibration: run a little real text through the model and keep what each linear layer saw.

AWQ (which input channels matter) and Wanda (|W| x input norm) both need the *activations*
entering each linear layer, not just the weights. Rather than re-implementing the forward pass,
this wraps the ref backend's ops: `linear` and `rms_norm` record their inputs, keyed by the
identity of the weight tensor they were given, and then call the real op. The model, the KV
cache and the scoring code are the engine's own.

The calibration text is the docstrings of standard-library modules that are *not* in the
perplexity corpus (`evaluate.EVAL_MODULES`), so a method tuned on it is never scored on it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from minillm.compress.evaluate import EVAL_MODULES, stdlib_docs_corpus
from minillm.config import ModelConfig
from minillm.kernels import get_backend
from minillm.model.llama import LlamaModel
from minillm.model.scoring import sequence_logits
from minillm.model.weights import ModelWeights

CALIBRATION_MODULES = ("collections", "itertools", "random", "typing", "pathlib", "dataclasses",
                       "contextlib", "enum", "csv", "logging")  # fmt: skip
assert not set(CALIBRATION_MODULES) & set(EVAL_MODULES), "calibration must not see eval text"

# where a captured input goes: the linears that read it
INPUT_KINDS = ("attn_in", "o_in", "mlp_in", "down_in")  # q/k/v, o, gate/up, down


def calibration_text() -> str:
    return stdlib_docs_corpus(CALIBRATION_MODULES)


def calibration_ids(tokenizer, num_tokens: int = 512) -> list[int]:  # noqa: ANN001 - Tokenizer
    """The first `num_tokens` tokens of the calibration text."""
    ids = tokenizer.encode(calibration_text())
    if num_tokens > len(ids):
        raise ValueError(f"asked for {num_tokens} calibration tokens, the text has {len(ids)}")
    return ids[:num_tokens]


@dataclass
class Activations:
    """Inputs seen by each layer's linears and norms, rows = calibration tokens.

    ``inputs[(layer, kind)]`` is (N, in) for kind in INPUT_KINDS; ``hidden[i]`` is the residual
    stream entering layer i (i = num_layers: what the final norm sees), (N, d).
    """

    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def mean_abs(self, layer: int, kind: str) -> torch.Tensor:
        """Per-input-channel mean |x| (AWQ's activation statistic)."""
        return self.inputs[(layer, kind)].abs().mean(0)

    def l2_norm(self, layer: int, kind: str) -> torch.Tensor:
        """Per-input-channel ||x||_2 over the calibration tokens (Wanda's statistic)."""
        return self.inputs[(layer, kind)].norm(dim=0)


class RecordingOps(SimpleNamespace):
    """The ref backend with `linear` and `rms_norm` that note their inputs first.

    Public because two passes record through it: calibration (AWQ, Wanda) keys the inputs of
    linears and norms, distillation keys norm inputs only to keep the teacher's hidden states.
    """

    def __init__(self, ops, linear_keys: dict[int, tuple[int, str]], norm_keys: dict[int, int]):  # noqa: ANN001
        super().__init__(**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")})
        self._ops, self._linear_keys, self._norm_keys = ops, linear_keys, norm_keys
        self.seen: dict[object, list[torch.Tensor]] = defaultdict(list)
        self.linear = self._linear
        self.rms_norm = self._rms_norm

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
        key = self._linear_keys.get(id(w))
        if key is not None:
            self.seen[key].append(x.detach().clone())
        return self._ops.linear(x, w, bias)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float):
        key = self._norm_keys.get(id(weight))
        if key is not None:
            self.seen[key].append(x.detach().clone())
        return self._ops.rms_norm(x, weight, eps)


@torch.inference_mode()
def capture_activations(
    config: ModelConfig, weights: ModelWeights, token_ids: list[int], window: int = 512
) -> Activations:
    """Run `token_ids` (in windows that each start fresh) and keep every linear's input."""
    if len(token_ids) < 2:
        raise ValueError("calibration needs at least 2 tokens")
    ref = get_backend("ref")
    model = LlamaModel(config, weights, ref)
    linear_keys: dict[int, tuple[int, str]] = {}
    norm_keys: dict[int, int] = {}
    for i, layer in enumerate(model.layers):
        for w, kind in ((layer.wq, "attn_in"), (layer.wo, "o_in"), (layer.w_gate, "mlp_in"),
                        (layer.w_down, "down_in")):  # fmt: skip
            linear_keys[id(w)] = (i, kind)
        norm_keys[id(layer.attn_norm)] = i
    norm_keys[id(model.final_norm)] = config.num_layers
    recorder = RecordingOps(ref, linear_keys, norm_keys)
    model.ops = recorder
    for start in range(0, len(token_ids), window):
        chunk = token_ids[start : start + window]
        if chunk:
            sequence_logits(model, chunk)
    acts = Activations()
    for key, parts in recorder.seen.items():
        stacked = torch.cat(parts)
        if isinstance(key, tuple):
            acts.inputs[key] = stacked
        else:
            acts.hidden[key] = stacked
    return acts
