"""The mixture-of-experts feed-forward (model/moe.py) against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from minillm import LLM, SamplingParams
from minillm.config import ModelConfig, MoEConfig
from minillm.kernels import get_backend
from minillm.model.llama import LlamaModel
from minillm.model.weights import load_hf_weights
from minillm.testing import make_tiny_model, make_tiny_moe_model, prefill_logits

IDS = [(13 * i) % 300 + 3 for i in range(1, 50)]


def _hf(path):  # noqa: ANN001, ANN202
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ours(path, backend: str = "ref") -> LlamaModel:  # noqa: ANN001
    cfg = ModelConfig.from_hf_config(path / "config.json")
    return LlamaModel(cfg, load_hf_weights(path, cfg), get_backend(backend))


@pytest.mark.parametrize(
    "arch,backend,extra",
    [
        ("mixtral", "ref", {}),
        ("mixtral", "cpu", {}),
        ("qwen2_moe", "ref", {}),
        # a dense first layer, and Qwen's renormalised variant
        ("qwen2_moe", "ref", {"mlp_only_layers": [0], "norm_topk_prob": True}),
    ],
)
def test_moe_logits_match_hf(tmp_path, arch, backend, extra):
    path = make_tiny_moe_model(tmp_path / arch, arch, num_experts=6, seed=2, **extra)
    ours, hf = _ours(path, backend), _hf(path)
    assert ours.config.moe is not None
    assert (ours.layers[0].moe is None) == (0 in extra.get("mlp_only_layers", []))
    assert ours.layers[1].moe is not None
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    got = prefill_logits(ours, IDS)
    assert (got - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 0.1  # a real signal, not two zeros agreeing
    assert ours.config.num_params == sum(p.numel() for p in hf.parameters())


def test_expert_counts_match_hf_router(tmp_path):
    """Tokens per expert, per layer, equal a count made from HF's own router logits."""
    path = make_tiny_moe_model(tmp_path / "m", "mixtral", num_experts=8, top_k=2, seed=4)
    ours, hf = _ours(path), _hf(path)
    prefill_logits(ours, IDS)
    counts = ours.expert_counts
    assert counts is not None and counts.layers == [0, 1]
    assert counts.counts.sum(dim=1).tolist() == [len(IDS) * 2] * 2  # tokens x top_k per layer
    with torch.no_grad():
        router_logits = hf(torch.tensor([IDS]), output_router_logits=True).router_logits
    for row, logits in enumerate(router_logits):
        top = torch.topk(logits.reshape(len(IDS), 8), 2, dim=-1).indices
        assert counts.counts[row].tolist() == torch.bincount(top.reshape(-1), minlength=8).tolist()
    assert counts.load_imbalance().min().item() >= 1.0
    counts.reset()
    assert counts.counts.sum().item() == 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_greedy_generation_matches_hf(tmp_path, arch):
    path = make_tiny_moe_model(tmp_path / arch, arch, seed=5)
    hf = _hf(path)
    with LLM(str(path), backend="ref", block_size=4) as llm:
        for prompt in ([5, 9, 11], list(range(20, 45))):
            with torch.no_grad():
                ref = hf.generate(
                    torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12
                )[0, len(prompt) :].tolist()
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            assert llm.generate([prompt], params)[0].outputs[0].token_ids == ref


def test_dense_model_has_no_expert_counts(tmp_path):
    assert _ours(make_tiny_model(tmp_path / "d")).expert_counts is None


def test_moe_gguf_is_a_clear_error():
    md = {"general.architecture": "llama", "llama.expert_count": 8}
    with pytest.raises(ValueError, match="mixture-of-experts.*Hugging Face folders"):
        ModelConfig.from_gguf_metadata(md)


def test_bad_moe_configs_are_named():
    with pytest.raises(ValueError, match="num_experts_per_tok must be in 1..num_experts=4"):
        MoEConfig(
            num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8, norm_topk_prob=True
        )
    with pytest.raises(ValueError, match="num_experts must be a positive"):
        MoEConfig(
            num_experts=0, num_experts_per_tok=1, moe_intermediate_size=8, norm_topk_prob=True
        )


def test_dense_only_paths_refuse_an_moe_model_by_name(tmp_path):
    """Compression and export are written for dense MLPs: an MoE model gets a clear error
    naming the limitation, not an AttributeError on a missing w_gate deep inside."""
    from minillm.compress.awq import awq_scale_model
    from minillm.compress.hf_export import hf_state_dict
    from minillm.compress.prune import prune_model
    from minillm.compress.quantize import quantize_model
    from minillm.formats.gguf_write import gguf_tensors

    path = make_tiny_moe_model(tmp_path / "m", "mixtral", 4, 2)
    cfg = ModelConfig.from_hf_config(path / "config.json")
    weights = load_hf_weights(path, cfg)
    calls = {
        "quantization": lambda: quantize_model(cfg, weights, "q8_0"),
        "pruning": lambda: prune_model(weights, "magnitude", 0.5),
        "AWQ": lambda: awq_scale_model(cfg, weights, [1, 2, 3]),
        "HF export": lambda: hf_state_dict(cfg, weights),
        "GGUF export": lambda: gguf_tensors(cfg, weights),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{what} supports dense models only.*layer 0"):
            call()
    dense = make_tiny_model(tmp_path / "d")
    dense_cfg = ModelConfig.from_hf_config(dense / "config.json")
    load_hf_weights(dense, dense_cfg).require_dense("quantization")  # no error


def test_tp_sizes_of_an_all_moe_model_ignore_the_unused_dense_width(tmp_path):
    """An all-MoE layer stack never uses intermediate_size, so it must not limit TP sizes; a
    dense first layer (mlp_only_layers) makes it count again."""
    from minillm.parallel.sizes import check_tp_size, valid_tp_sizes

    all_moe = make_tiny_moe_model(tmp_path / "a", "qwen2_moe", 4, 2, intermediate_size=91)
    cfg = ModelConfig.from_hf_config(all_moe / "config.json")
    assert valid_tp_sizes(cfg) == [1, 2]  # heads 4, KV heads 2; 91 is not a constraint
    check_tp_size(cfg, 2)
    mixed = make_tiny_moe_model(
        tmp_path / "m", "qwen2_moe", 4, 2, intermediate_size=91, mlp_only_layers=[0]
    )
    mixed_cfg = ModelConfig.from_hf_config(mixed / "config.json")
    with pytest.raises(ValueError, match="intermediate_size=91"):
        check_tp_size(mixed_cfg, 2)
