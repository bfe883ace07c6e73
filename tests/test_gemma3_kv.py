"""Gemma 3's paged KV in the engine: window layers give back the blocks behind their window.

Real model on the cpu backend: greedy tokens of a prompt past the 512-token window are the
same with freeing on and off (and on, the default, is what test_gemma3_vs_transformers checks
against transformers); mid-generation, the blocks and bytes a sequence holds equal the formula
(global layers: every block; window layers: from the window's first block on); the KV-usage
metric reports them. A Llama model keeps one block table."""

from __future__ import annotations

import pytest

from minillm.engine.llm_engine import EngineConfig, LLMEngine
from minillm.kv.block_manager import BlockManager
from minillm.kv.cache import KVCache
from minillm.kv.hybrid_block_manager import HybridBlockManager
from minillm.loader import load_model
from minillm.sampling import SamplingParams
from minillm.testing import make_tiny_model

NEW = 24


@pytest.fixture(scope="module")
def gemma(gemma3_gguf_path):
    return load_model(gemma3_gguf_path, "cpu")


def _prompt(loaded) -> list[int]:  # noqa: ANN001
    text = " ".join(f"Item {i} is {['north', 'south', 'east'][i % 3]} of {i * 5 % 11}."
                    for i in range(70))  # fmt: skip
    ids = loaded.tokenizer.encode(text)
    assert 600 < len(ids) < 900, len(ids)
    return ids


def _generate(loaded, ids: list[int], free: bool, probe=None) -> list[int]:  # noqa: ANN001
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(max_num_batched_tokens=256, free_out_of_window=free, kv_cache_memory="64MiB"),
    )
    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        if probe is not None and engine.scheduler.running:
            probe(engine, engine.scheduler.running[0])
    return tokens


def test_freeing_window_blocks_changes_no_token_and_holds_the_formula(gemma):
    cfg = gemma.model.config
    windows = gemma.model.layer_windows
    ids = _prompt(gemma)
    seen: list[int] = []

    def probe(engine, seq) -> None:  # noqa: ANN001
        bm, kv = engine.block_manager, engine.kv_cache
        assert isinstance(bm, HybridBlockManager)
        n, bs = seq.num_computed_tokens, bm.block_size
        blocks = -(-n // bs)
        expected_layer_blocks = sum(
            blocks - (max(n - w + 1, 0) // bs if w else 0) for w in windows
        )  # fmt: skip
        page = KVCache.bytes_per_block(1, bs, cfg.num_kv_heads, cfg.head_dim)  # one layer
        held = bm.blocks_held(seq) * kv.layout.page_layers
        assert held == expected_layer_blocks
        assert kv.nbytes * bm.usage == pytest.approx(held * page)  # the usage metric
        bm.check_invariants(engine.scheduler.running)
        seen.append(n)

    on = _generate(gemma, ids, True, probe)
    off = _generate(gemma, ids, False)
    assert on == off and len(on) == NEW
    assert max(seen) > 512 + 16  # the probe ran while blocks were being freed


def test_llama_keeps_one_block_table(tmp_path):
    loaded = load_model(make_tiny_model(tmp_path), "ref")
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(num_kv_blocks=8))
    assert type(engine.block_manager) is BlockManager
    assert engine.kv_cache.layout.num_groups == 1
    assert len({id(t) for t in engine.kv_cache.k}) == loaded.model.config.num_layers


def test_prefix_hit_past_the_window_gives_the_same_tokens(gemma):
    """The same long prompt twice on one engine: the second admission hits the cache (global
    blocks for the whole prefix, window blocks only for its last window) and decodes the same
    greedy tokens as the first, which computed everything."""
    ids = _prompt(gemma)
    engine = LLMEngine(
        gemma.model,
        gemma.tokenizer,
        EngineConfig(max_num_batched_tokens=256, kv_cache_memory="64MiB"),
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for rid in ("first", "second"):
        engine.add_request(rid, ids, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs.append(out)
    bm = engine.block_manager
    assert bm.prefix_cache_hits >= (len(ids) - 1) // bm.block_size * bm.block_size
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    bm.check_invariants([])
