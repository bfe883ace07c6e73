"""How much did compression hurt? Perplexity on fixed offline text, and a greedy task check.

The held-out text is the Python standard library's own documentation: the docstrings of a
fixed list of pure-Python modules and of their public functions and classes, in a fixed
order. It is English prose about code, exists offline on every machine with Python, and
the model never saw it in this form as a single document. `corpus_fingerprint()` names the
exact text (Python version + sha256), so two figures are comparable only when it matches.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.model.llama import LlamaModel
from minillm.model.scoring import token_logprobs

EVAL_MODULES = (
    "argparse",
    "bisect",
    "difflib",
    "fractions",
    "heapq",
    "json",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "functools",
    "calendar",
)


def stdlib_docs_corpus(modules: Sequence[str] = EVAL_MODULES) -> str:
    """The evaluation text: module docstrings, then public members' docstrings, sorted by name."""
    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (
                (inspect.isfunction(obj) or inspect.isclass(obj))
                and obj.__doc__
                and getattr(obj, "__module__", None) == name
            ):
                parts.append(inspect.cleandoc(obj.__doc__))
    return "\n\n".join(parts)


def corpus_fingerprint(text: str) -> str:
    return f"python-{platform.python_version()}-sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Perplexity:
    value: float  # exp(mean negative log-likelihood per predicted token)
    nll: float
    num_tokens: int  # tokens predicted

    def delta_pct(self, baseline: Perplexity) -> float:
        return 100.0 * (self.value - baseline.value) / baseline.value


def perplexity(
    model: LlamaModel, token_ids: Sequence[int], window: int = 512, max_tokens: int | None = None
) -> Perplexity:
    """Perplexity over non-overlapping windows of `window` tokens (each starts fresh)."""
    ids = list(token_ids[:max_tokens] if max_tokens else token_ids)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        lp = token_logprobs(model, chunk)
        total -= float(lp.double().sum())
        count += lp.numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count)


TASK_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 plus 30?",
    "Translate 'good morning' into French.",
    "Write one sentence about the moon.",
    "What does a CPU do?",
    "List two programming languages.",
    "Why do we sleep?",
)


@dataclass(frozen=True)
class TaskCheck:
    exact: float  # fraction of prompts whose greedy answer is identical to the baseline's
    prefix: float  # mean fraction of baseline tokens matched before the first difference


def task_check(answers: Sequence[Sequence[int]], baseline: Sequence[Sequence[int]]) -> TaskCheck:
    """Compare greedy answers (token ids) to the uncompressed model's answers."""
    if len(answers) != len(baseline) or not answers:
        raise ValueError("answers and baseline must be non-empty and of equal length")
    exact, prefix = 0, 0.0
    for a, b in zip(answers, baseline, strict=True):
        exact += list(a) == list(b)
        same = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
        prefix += same / max(len(b), 1)
    return TaskCheck(exact / len(answers), prefix / len(answers))


@torch.inference_mode()
def greedy_answers(
    llm,
    prompts: Sequence[str] = TASK_PROMPTS,
    max_tokens: int = 24,
) -> list[list[int]]:  # noqa: ANN001 - minillm.LLM
    from minillm.sampling import SamplingParams

    outs = llm.chat(
        [[{"role": "user", "content": p}] for p in prompts],
        SamplingParams(temperature=0, max_tokens=max_tokens),
    )
    return [o.outputs[0].token_ids for o in outs]
