"""minillm.estimate_parallel: traffic formulas and the scale planner, checked by hand and against
the course notes' scale table (note 000: <30B on one or two GPUs, 30-70B TP in one node,
70-200B and beyond TP+PP over nodes)."""

from __future__ import annotations

import pytest

from minillm import estimate_parallel as P
from minillm.estimate import KNOWN_MODELS, ModelSpec

L70 = KNOWN_MODELS["Llama-3-70B"]
MIXTRAL = KNOWN_MODELS["Mixtral-8x7B"]
QWEN_MOE = KNOWN_MODELS["Qwen1.5-MoE-A2.7B"]
L405 = KNOWN_MODELS["Llama-3.1-405B"]


def test_moe_active_parameters_match_the_published_figures():
    assert round(MIXTRAL.active_params() / 1e9, 1) == 12.9  # Mixtral's model card: 12.9B active
    assert round(QWEN_MOE.active_params() / 1e9, 1) == 2.7  # the "A2.7B" in the name
    assert L70.active_params() == L70.count_params()  # a dense model uses every weight


def test_moe_parameter_count_by_hand():
    d, f, e, layers, v = 4096, 14336, 8, 32, 32000
    attn = 2 * d * d + 2 * d * 1024
    layer = attn + e * 3 * d * f + e * d + 2 * d
    assert MIXTRAL.count_params() == 2 * v * d + layers * layer + d


def test_tp_traffic_by_hand():
    d, layers = 8192, 80
    # 2 all-reduces per layer, fp16 activations, ring all-reduce sends 2 (t-1)/t of the buffer
    assert P.tp_bytes_per_token(L70, 8) == 2 * layers * 2 * 7 / 8 * d * 2
    assert P.tp_bytes_per_token(L70, 1) == 0
    assert P.tp_messages_per_token(L70, 4) == 160


def test_pp_ep_cp_pd_traffic_by_hand():
    assert P.pp_bytes_per_token(L405, 2) == 16384 * 2
    assert P.pp_bytes_per_token(L405, 1) == 0
    # Mixtral: top-2, 32 MoE layers, half the experts remote on 2 ranks, dispatch + combine
    assert P.ep_bytes_per_token(MIXTRAL, 2) == 32 * 2 * 2 * 4096 * 2 * 0.5
    with pytest.raises(ValueError, match="no experts"):
        P.ep_bytes_per_token(L70, 2)
    kv_per_token = 2 * 80 * 8 * 128 * 2
    assert P.cp_bytes_per_prefill(L70, 4, 1000) == 3 * 1000 * kv_per_token
    assert P.pd_kv_bytes(L70, 1000) == 1000 * kv_per_token


def test_bubble_fraction():
    assert P.bubble_fraction(1, 4) == 0
    assert P.bubble_fraction(4, 1) == 3 / 4  # no micro-batching: one stage busy at a time
    assert P.bubble_fraction(4, 13) == pytest.approx(3 / 16)


def test_link_time_adds_latency_per_message_to_bytes_over_bandwidth():
    link = P.Link("test", 10, 5)
    assert link.seconds(10e9) == pytest.approx(1 + 5e-6)
    assert link.seconds(0, messages=160) == pytest.approx(160 * 5e-6)


@pytest.mark.parametrize(
    ("name", "tp", "pp", "nodes"),
    [
        ("Qwen2.5-7B", 1, 1, 1),  # < 30B: one GPU
        ("Qwen2.5-32B", 2, 1, 1),  # 30-70B: TP inside one node
        ("Llama-3-70B", 4, 1, 1),
        ("Llama-3.1-405B", 8, 2, 2),  # > 200B: TP=8 per node, PP over nodes
    ],
)
def test_plan_reproduces_the_notes_scale_table(name, tp, pp, nodes):
    plan = P.plan_parallel(KNOWN_MODELS[name], "H100-80GB", bits=16, context_len=4096, batch=16)
    assert (plan.tp, plan.pp, plan.nodes) == (tp, pp, nodes)
    assert plan.fits and plan.per_gpu_bytes <= 80 * 2**30 * 0.9


def test_plan_splits_experts_of_an_moe_model():
    plan = P.plan_parallel(MIXTRAL, "H100-80GB", bits=16)
    assert plan.tp == plan.ep == 2 and "EP=2" in plan.why


def test_valid_tp_sizes_follow_the_heads():
    smol = KNOWN_MODELS["SmolLM2-135M"]
    assert P.valid_tp_sizes(smol, 9) == [1, 3, 9]


def test_bad_input():
    with pytest.raises(ValueError, match="experts_per_tok"):
        ModelSpec("x", 1, 1, 64, 4, 4, 16, 10, 128, num_experts=4, experts_per_tok=5,
                  moe_intermediate_size=32)  # fmt: skip
    with pytest.raises(ValueError, match="tp"):
        P.tp_messages_per_token(L70, 0)
    with pytest.raises(ValueError, match="stages"):
        P.bubble_fraction(0, 1)
