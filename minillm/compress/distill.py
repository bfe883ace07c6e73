"""Knowledge distillation: train a small student to imitate a big teacher.

Hinton, Vinyals & Dean (2015): a teacher's full output distribution carries far more signal
than the one correct token ("dark knowledge": which wrong answers are almost right). Soften
both distributions with a temperature T and train the student on

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

(T^2 keeps the soft term's gradients on the same scale whatever T is). Variants:

- **logit distillation**: the loss above, on every position of the text;
- **feature distillation** (FitNets, TinyBERT): also match hidden states, through a learned
  projection when the widths differ: ||P h_student - h_teacher||^2;
- **reasoning-trace distillation** (as in DeepSeek-R1's distilled models) is sequence-level:
  fine-tune on texts the teacher *generated*; it needs no logits at all, only `LLM.generate`.

Here the teacher is the engine (`minillm` runs it, `sequence_logits` gives its logits at every
position), the student a `StudentLlama` built from some of the teacher's layers. Keeping all
V = 49k logits per token would take 200 KB a token, so the teacher's top-k logits are kept
(k = 64 covers nearly all of its probability mass); the KL is taken over those k tokens.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minillm.compress.calibration import RecordingOps
from minillm.compress.hf_export import save_hf_folder
from minillm.compress.student import StudentLlama
from minillm.config import ModelConfig
from minillm.kernels import get_backend
from minillm.model.llama import LlamaModel
from minillm.model.scoring import sequence_logits
from minillm.model.weights import ModelWeights


# --------------------------------------------------------------------------- losses
def _check(temperature: float, alpha: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    Logits (N, V), labels (N,); KL summed over the vocabulary and averaged over the N rows.
    No gradient flows into the teacher.
    """
    _check(temperature, alpha)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"logits must both be (N, V), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")  # fmt: skip
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(
        student_logits.float(), labels
    )


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """`distillation_loss` with only the teacher's top-k logits (N, k) and their token ids.

    The teacher distribution is renormalised over its k tokens; the student's log-probs are
    those of its full softmax, read at the same k tokens. With k = V it is the full loss.
    """
    _check(temperature, alpha)
    if (
        teacher_values.shape != teacher_indices.shape
        or teacher_values.shape[0] != student_logits.shape[0]
    ):
        raise ValueError("teacher values/indices must be (N, k), matching the student's N rows")
    log_t = F.log_softmax(teacher_values.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, teacher_indices)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(
        student_logits.float(), labels
    )


def feature_distillation_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module
) -> torch.Tensor:
    """||P h_s - h_t||^2 / ||h_t||^2 (mean over tokens): scale-free hidden-state matching."""
    projected = projection(student_hidden)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(f"projected student states {tuple(projected.shape)} do not match the "
                         f"teacher's {tuple(teacher_hidden.shape)}")  # fmt: skip
    return (projected - teacher_hidden).pow(2).mean() / teacher_hidden.pow(2).mean()


# --------------------------------------------------------------------------- teacher targets
@dataclass
class TeacherTargets:
    """What the teacher says about fixed windows of training text (computed once)."""

    windows: torch.Tensor  # (W, L) token ids
    top_values: torch.Tensor  # (W, L, k) the teacher's largest logits at each position
    top_indices: torch.Tensor  # (W, L, k) their token ids
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> (W, L, d)
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.windows.numel()


@torch.inference_mode()
def teacher_targets(
    config: ModelConfig,
    weights: ModelWeights,
    token_ids: Sequence[int],
    seq_len: int = 128,
    top_k: int = 64,
    hidden_layers: Sequence[int] = (),
) -> TeacherTargets:
    """Run the teacher (the engine's ref backend) over non-overlapping windows of the text.

    `hidden_layers`: teacher layers whose *output* (residual stream) to keep, for feature
    distillation. Each window starts fresh, exactly as the student will see it.
    """
    if seq_len < 2 or len(token_ids) < seq_len:
        raise ValueError(f"need at least seq_len={seq_len} >= 2 tokens, got {len(token_ids)}")
    t0 = time.perf_counter()
    ref = get_backend("ref")
    model = LlamaModel(config, weights, ref)
    # layer L's output is what layer L + 1's first norm (or the final norm) reads
    norms = [layer.attn_norm for layer in model.layers[1:]] + [model.final_norm]
    norm_keys = {id(norms[layer]): layer for layer in hidden_layers}
    recorder = RecordingOps(ref, {}, norm_keys)
    model.ops = recorder
    n = len(token_ids) // seq_len
    windows = torch.tensor(list(token_ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)
    values, indices = [], []
    for w in windows:
        top = sequence_logits(model, w.tolist()).topk(top_k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    hidden = {layer: torch.stack(recorder.seen[layer]) for layer in hidden_layers}
    return TeacherTargets(windows, torch.stack(values), torch.stack(indices), hidden,
                          time.perf_counter() - t0)  # fmt: skip


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) term; 0 = hard labels only
    feature_weight: float = 0.0  # > 0: also match hidden states (feature distillation)
    # (student block, teacher layer) pairs whose outputs feature distillation matches
    feature_pairs: tuple[tuple[int, int], ...] = ()
    freeze_blocks: int = 0  # the first n student blocks stay fixed (backward stops above them)
    lr: float = 2e-4
    batch_size: int = 4
    max_steps: int | None = None
    time_budget_s: float | None = None
    seed: int = 0
    train_embeddings: bool = False  # the (tied) 49k x d embedding is most of the parameters

    def __post_init__(self) -> None:
        _check(self.temperature, self.alpha)
        if self.max_steps is None and self.time_budget_s is None:
            raise ValueError("give max_steps or time_budget_s (or both)")
        if self.feature_weight < 0 or self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("feature_weight must be >= 0, lr and batch_size > 0")
        if self.feature_weight > 0 and not self.feature_pairs:
            raise ValueError(
                "feature distillation needs feature_pairs (student block, teacher layer)"
            )
        if self.freeze_blocks < 0:
            raise ValueError(f"freeze_blocks must be >= 0, got {self.freeze_blocks}")


@dataclass
class DistillResult:
    student: StudentLlama
    losses: list[float]  # training loss per step
    steps: int
    seconds: float
    tokens_seen: int


def distill(student: StudentLlama, targets: TeacherTargets, cfg: DistillConfig) -> DistillResult:
    """Train (a copy of) `student` on the teacher's targets; `student` itself is left as is.

    The student is usually made from the teacher: some of its layers
    (`StudentLlama.from_teacher`) or its structurally pruned weights (`compress.prune`).
    Batches of windows are drawn in a seeded order; training stops at `max_steps` or when
    `time_budget_s` has passed, whichever comes first. alpha = 0 and feature_weight = 0 is the
    hard-label baseline: the same loop on the text alone.
    """
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(student)
    student.embed.requires_grad_(cfg.train_embeddings)
    projections = nn.ModuleList()
    if cfg.feature_weight > 0:
        bad = [b for b, _ in cfg.feature_pairs if not 0 <= b < len(student.blocks)]
        if bad:
            raise ValueError(
                f"feature_pairs name student blocks {bad}; it has {len(student.blocks)}"
            )
        missing = [t for _, t in cfg.feature_pairs if t not in targets.hidden]
        if missing:
            raise ValueError(f"feature distillation needs the teacher's hidden states of {missing}")
        for _, layer in cfg.feature_pairs:
            width = targets.hidden[layer].shape[-1]
            proj = nn.Linear(student.config.hidden_size, width, bias=False)
            nn.init.eye_(proj.weight)
            projections.append(proj)
    for block in student.blocks[: cfg.freeze_blocks]:
        block.requires_grad_(False)
    params = [p for p in [*student.parameters(), *projections.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(targets.windows), generator=generator)
    losses: list[float] = []
    t0, step, cursor, seen = time.perf_counter(), 0, 0, 0
    student.train()
    while cfg.max_steps is None or step < cfg.max_steps:
        if cfg.time_budget_s is not None and time.perf_counter() - t0 >= cfg.time_budget_s:
            break
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(targets.windows), generator=generator), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        ids = targets.windows[idx]
        logits, hidden = student(ids, return_hidden=True)
        v = logits.shape[-1]
        s = logits[:, :-1].reshape(-1, v)
        labels = ids[:, 1:].reshape(-1)
        if cfg.alpha > 0:
            k = targets.top_values.shape[-1]
            loss = topk_distillation_loss(
                s,
                targets.top_values[idx, :-1].reshape(-1, k),
                targets.top_indices[idx, :-1].reshape(-1, k),
                labels,
                cfg.temperature,
                cfg.alpha,
            )
        else:
            loss = F.cross_entropy(s, labels)  # fmt: skip
        for proj, (block, layer) in zip(projections, cfg.feature_pairs, strict=False):
            loss = loss + cfg.feature_weight * feature_distillation_loss(
                hidden[block], targets.hidden[layer][idx], proj
            ) / len(cfg.feature_pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        seen += ids.numel()
    student.eval()
    return DistillResult(student, losses, step, time.perf_counter() - t0, seen)


def save_student(student: StudentLlama, folder: str | os.PathLike[str], tokenizer) -> Path:  # noqa: ANN001
    """The student as an HF folder with the teacher's tokenizer and chat template."""
    name = f"{student.config.name or 'student'} ({student.config.num_layers}-layer student)"
    config = type(student.config)(**{**vars(student.config), "name": name})
    return save_hf_folder(folder, config, student.to_weights(), tokenizer)
