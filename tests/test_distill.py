"""Distillation: losses against torch.nn.functional, the student against the engine and
transformers, and a short training run on a tiny random model that must lower the loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from minillm import LLM
from minillm.compress.calibration import calibration_ids
from minillm.compress.distill import (
    DistillConfig,
    distill,
    distillation_loss,
    feature_distillation_loss,
    save_student,
    teacher_targets,
    topk_distillation_loss,
)
from minillm.compress.student import StudentLlama, evenly_spaced_layers
from minillm.loader import read_model_files
from minillm.model.scoring import sequence_logits
from minillm.testing import make_tiny_model

GEN = torch.Generator().manual_seed(11)


def reference_loss(s, t, y, temperature, alpha):  # noqa: ANN001, ANN201
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    log_target=True, reduction="batchmean")  # fmt: skip
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (2.0, 0.9), (4.0, 1.0), (0.5, 0.0)])
def test_distillation_loss_matches_torch(temperature, alpha):
    student = (torch.randn(12, 40, generator=GEN) * 3).requires_grad_(True)
    teacher = (torch.randn(12, 40, generator=GEN) * 3).requires_grad_(True)
    labels = torch.randint(0, 40, (12,), generator=GEN)
    ours = distillation_loss(student, teacher, labels, temperature, alpha)
    s_ref = student.detach().clone().requires_grad_(True)
    ref = reference_loss(s_ref, teacher.detach(), labels, temperature, alpha)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(student.grad, s_ref.grad)
    assert teacher.grad is None  # the teacher is a fixed target


def test_topk_loss_is_the_full_loss_when_k_is_the_vocabulary():
    s, t = torch.randn(10, 30, generator=GEN), torch.randn(10, 30, generator=GEN) * 2
    y = torch.randint(0, 30, (10,), generator=GEN)
    top = t.topk(30)
    full = distillation_loss(s, t, y, 2.0, 0.7)
    torch.testing.assert_close(
        topk_distillation_loss(s, top.values, top.indices, y, 2.0, 0.7), full
    )
    # a peaked teacher: its top 5 hold nearly all the mass, so top-5 is close to the full loss
    peaked = t * 8
    top5 = peaked.topk(5)
    approx = topk_distillation_loss(s, top5.values, top5.indices, y, 1.0, 1.0)
    assert approx == pytest.approx(float(distillation_loss(s, peaked, y, 1.0, 1.0)), rel=0.05)


def test_feature_loss_and_bad_inputs():
    h_s, h_t = torch.randn(2, 5, 8, generator=GEN), torch.randn(2, 5, 8, generator=GEN)
    proj = nn.Linear(8, 8, bias=False)
    expected = ((proj(h_s) - h_t) ** 2).mean() / (h_t**2).mean()
    torch.testing.assert_close(feature_distillation_loss(h_s, h_t, proj), expected)
    nn.init.eye_(proj.weight)
    assert feature_distillation_loss(h_t, h_t, proj).item() == 0.0
    x, y = torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(x, x, y, temperature=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(x, x, y, alpha=1.5)
    with pytest.raises(ValueError, match=r"must both be \(N, V\)"):
        distillation_loss(x, x[:, :3], y)
    with pytest.raises(ValueError, match="do not match"):
        feature_distillation_loss(h_s, h_t[..., :4], proj)
    with pytest.raises(ValueError, match="max_steps or time_budget_s"):
        DistillConfig()
    with pytest.raises(ValueError, match="needs feature_pairs"):
        DistillConfig(max_steps=1, feature_weight=1.0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("d") / request.param, request.param, seed=8)
    return (folder, *read_model_files(folder))


def test_student_computes_what_the_engine_computes(tiny):
    folder, config, weights, tokenizer = tiny
    student = StudentLlama.from_teacher(config, weights, list(range(config.num_layers)))
    llm = LLM(str(folder), backend="ref")
    ids = tokenizer.encode("def add(a, b):\n    return a + b\n")
    with torch.no_grad():
        ours = student(torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, sequence_logits(llm.loaded.model, ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="increasing and distinct"):
        StudentLlama.from_teacher(config, weights, [1, 0])


def test_distill_lowers_the_loss_and_saves_a_loadable_student(tiny, tmp_path):
    folder, config, weights, tokenizer = tiny
    targets = teacher_targets(config, weights, calibration_ids(tokenizer, 512), seq_len=64,
                              top_k=16, hidden_layers=[1])  # fmt: skip
    assert targets.top_values.shape == (8, 64, 16) and targets.hidden[1].shape == (8, 64, 64)
    student = StudentLlama.from_teacher(config, weights, [1])  # drop layer 0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for alpha, feature in ((0.8, 0.0), (0.5, 1.0), (0.0, 0.0)):
        cfg = DistillConfig(alpha=alpha, feature_weight=feature, feature_pairs=((0, 1),), lr=2e-3,
                            max_steps=24, batch_size=2)  # fmt: skip
        result = distill(student, targets, cfg)
        assert result.steps == 24 and result.tokens_seen == 24 * 2 * 64
        first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
        assert last < first, (alpha, feature, result.losses)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    out = save_student(result.student, tmp_path / "student", tokenizer)
    llm = LLM(str(out), backend="ref")
    assert llm.config.num_layers == 1
    text = "Large language models predict the next token."
    ids = tokenizer.encode(text)
    assert llm.tokenizer.encode(text) == ids
    assert llm.tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        want = result.student(torch.tensor([ids]))[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sequence_logits(llm.loaded.model, ids), want, atol=1e-4, rtol=1e-4)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(30, 1) == [29] and evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep must be in 1..30"):
        evenly_spaced_layers(30, 31)


def test_frozen_blocks_do_not_move(tiny):
    _, config, weights, tokenizer = tiny
    targets = teacher_targets(config, weights, calibration_ids(tokenizer, 128), seq_len=64, top_k=8)
    student = StudentLlama.from_teacher(config, weights, [0, 1])
    cfg = DistillConfig(alpha=0.5, lr=1e-2, max_steps=2, batch_size=1, freeze_blocks=1)
    trained = distill(student, targets, cfg).student
    assert all(torch.equal(a, b) for a, b in zip(trained.blocks[0].parameters(),
                                                 student.blocks[0].parameters(), strict=True))  # fmt: skip
    assert not torch.equal(trained.blocks[1].wq, student.blocks[1].wq)
    assert torch.equal(trained.embed, student.embed)  # embeddings frozen by default
    with pytest.raises(ValueError, match="name student blocks"):
        distill(student, targets, replace(cfg, feature_weight=1.0, feature_pairs=((5, 0),)))
