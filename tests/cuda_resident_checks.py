"""Checks of the cuda backend's resident path (kernels/cuda_fused.py, kernels/cuda_resident.py).

They run where the other cuda checks run (``test_kernels_cuda.py`` lists them in CHECKS): in
the simulator child process, and in-process on a real GPU. Every fused kernel is compared
with the ref ops it replaces, and the whole model with ref token for token.
"""

from __future__ import annotations

import numpy as np
import torch


def _helpers():  # noqa: ANN202 - the shared helpers of test_kernels_cuda (imported when run)
    import test_kernels_cuda as t

    return t


def _dev(t: torch.Tensor, dtype: type = np.float32):  # noqa: ANN202 - a device array
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(t.numpy(), dtype=dtype))


def _host(d) -> torch.Tensor:  # noqa: ANN001
    return torch.from_numpy(d.copy_to_host())


def check_fused_matvecs_match_ops() -> None:
    """qkv (norm + three projections, biases), glu (norm + gate/up + SiLU), the residual matvec
    and the final norm + lm_head on gathered rows, against ref's ops, in mixed formats and
    under both launch shapes."""
    from dataclasses import replace

    from numba import cuda

    from minillm.kernels.cuda_fused import make_glu, make_norm_matvec, make_qkv
    from minillm.kernels.cuda_linear import make_matvec
    from minillm.kernels.cuda_resident import matvec_launch

    t = _helpers()
    cu, ref = t._backends()
    g = torch.Generator().manual_seed(21)
    d, eps = 64, 1e-5
    x = torch.randn(3, d, generator=g) * 2
    norm_w = torch.randn(d, generator=g)
    h = ref.rms_norm(x, norm_w, eps)
    # the GPU's shapes in miniature: lanes that fold in a tree, several row slots per block,
    # grid-stride loops on both grid axes (the simulator pays a Python thread per GPU thread)
    warps = replace(cu.GPU_LAUNCH, lanes=8, rows_per_block=2, max_blocks=2)
    cases = [
        (cu.SIM_LAUNCH, ("Q4_1", "Q4_1", "Q8_0"), False),
        (cu.SIM_LAUNCH, ("F32", "Q4_0", "F32"), True),
        (warps if cu.SIMULATED else cu.GPU_LAUNCH, ("Q4_1", "Q8_0", "Q4_1"), True),
    ]
    for i, (cfg, fmts, with_bias) in enumerate(cases):
        what = f"{fmts} lanes={cfg.lanes}"
        w = [
            t._quant((n, d), f, seed=30 + 3 * i + j)
            for j, (n, f) in enumerate(zip((32, 16, 16), fmts, strict=True))
        ]
        wc, wr = [cu.prepare_linear(m) for m in w], [ref.prepare_linear(m) for m in w]
        biases = [torch.randn(m.shape[0], generator=g) for m in w] if with_bias else [None] * 3
        expected = torch.cat([ref.linear(h, m, b) for m, b in zip(wr, biases, strict=True)], 1)
        out = cuda.device_array((3, 64), np.float32)
        dev_b = [_dev(b) if b is not None else cu._no_bias() for b in biases]
        grid, block = matvec_launch(cfg, 64, 3)
        make_qkv(*fmts, cfg.lanes, cfg.rows_per_block, d)[grid, block](
            _dev(x), _dev(norm_w), np.float32(eps), *(m.data for m in wc), *dev_b,
            int(with_bias), out,
        )  # fmt: skip
        t._close(_host(out), expected, "qkv " + what)

        # glu: gate and up (f = 32 rows each) from the same normed row
        gate, up = (t._quant((32, d), fmts[j], seed=50 + j) for j in (0, 2))
        out = cuda.device_array((3, 32), np.float32)
        grid, block = matvec_launch(cfg, 32, 3)
        make_glu(fmts[0], fmts[2], cfg.lanes, cfg.rows_per_block, d)[grid, block](
            _dev(x), _dev(norm_w), np.float32(eps),
            cu.prepare_linear(gate).data, cu.prepare_linear(up).data, out,
        )  # fmt: skip
        expected = ref.silu_mul(
            ref.linear(h, ref.prepare_linear(gate)), ref.linear(h, ref.prepare_linear(up))
        )
        t._close(_host(out), expected, "glu " + what)

        # residual: out (3, d) += a (3, 32) @ W (d, 32).T, in place
        down = t._quant((d, 32), fmts[1], seed=60 + i)
        a = torch.randn(3, 32, generator=g)
        resid = _dev(x)
        grid, block = matvec_launch(cfg, d, 3)
        make_matvec(fmts[1], cfg.lanes, cfg.rows_per_block, accumulate=True)[grid, block](
            cu.prepare_linear(down).data, _dev(a), cu._no_bias(), 0, resid
        )
        t._close(_host(resid), x + ref.linear(a, ref.prepare_linear(down)), "residual " + what)

        # final norm + lm_head on rows 2 and 0 only
        head = t._quant((40, d), fmts[0], seed=70 + i)
        rows = torch.tensor([2, 0])
        out = cuda.device_array((2, 40), np.float32)
        grid, block = matvec_launch(cfg, 40, 2)
        make_norm_matvec(fmts[0], cfg.lanes, cfg.rows_per_block, d)[grid, block](
            _dev(x), _dev(rows, np.int64), _dev(norm_w), np.float32(eps),
            cu.prepare_linear(head).data, out,
        )  # fmt: skip
        t._close(_host(out), ref.linear(h[rows], ref.prepare_linear(head)), "lm_head " + what)


def check_rope_table_and_rope_store() -> None:
    """cos/sin from positions on the device equal the model's float64 host formula; rope_store
    rotates q and k and writes k, v to their slots as ref's rope + store_kv do (a negative slot
    writes nothing)."""
    from numba import cuda

    from minillm.kernels.cuda_fused import make_rope_store, make_rope_table
    from minillm.kernels.cuda_resident import flat_launch

    t = _helpers()
    cu, ref = t._backends()
    heads, kv_heads, dim = 4, 2, 16
    positions = torch.tensor([0, 7, 8191, 3])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos_ref, sin_ref = torch.cos(angles).float(), torch.sin(angles).float()
    g = torch.Generator().manual_seed(22)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * dim, generator=g)
    slots = torch.tensor([5, 13, -1, 30])
    for cfg in t._launch_configs():
        cos, sin = (cuda.device_array((4, dim // 2), np.float32) for _ in range(2))
        grid, threads = flat_launch(cfg, 4 * dim // 2)
        make_rope_table()[grid, threads](
            _dev(positions, np.int64), _dev(inv_freq, np.float64), cos, sin
        )
        t._close(_host(cos), cos_ref, "cos", atol=1e-6)
        t._close(_host(sin), sin_ref, "sin", atol=1e-6)

        kc_ref, vc_ref = t._paged_cache(seed=23)
        kc, vc = _dev(kc_ref), _dev(vc_ref)
        q = cuda.device_array((4, heads, dim), np.float32)
        grid, threads = flat_launch(cfg, 4 * (heads + 2 * kv_heads) * dim // 2)
        make_rope_store()[grid, threads](_dev(qkv), cos, sin, _dev(slots, np.int64), kc, vc, q)
        q_ref = ref.rope(qkv[:, : heads * dim].reshape(4, heads, dim), cos_ref, sin_ref)
        k_ref = ref.rope(
            qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(4, kv_heads, dim),
            cos_ref,
            sin_ref,
        )
        v_ref = qkv[:, (heads + kv_heads) * dim :].reshape(4, kv_heads, dim)
        keep = slots >= 0
        ref.store_kv(k_ref[keep], v_ref[keep], kc_ref, vc_ref, slots[keep])
        t._close(_host(q), q_ref, "rope q")
        t._close(_host(kc), kc_ref, "k cache")
        assert torch.equal(_host(vc), vc_ref), "v is copied to its slot, bit for bit"


def check_resident_engine_matches_ref() -> None:
    """The engine on cuda runs the resident forward and gives ref's greedy tokens: a batch
    of two prompts, a prefix-cache hit, n = 2 with copy-on-write. A decode step is
    2 + 6 * layers + 1 launches, and a repeated step allocates no new device buffer."""
    from minillm import LLM, SamplingParams

    t = _helpers()
    folder = str(t._tiny_model_dir())
    prompts = ["The quick brown fox", "KV cache"]
    opts = dict(block_size=4, num_kv_blocks=24)
    cu_llm, ref_llm = LLM(folder, backend="cuda", **opts), LLM(folder, backend="ref", **opts)
    model = cu_llm.engine.runner.model
    expected = t._greedy_tokens(ref_llm.engine, prompts, 4)
    assert t._greedy_tokens(cu_llm.engine, prompts, 4) == expected
    resident = model.resident
    assert resident is not None, "the engine's forward went op by op, not resident"
    assert t._greedy_tokens(cu_llm.engine, prompts[:1], 2) == [expected[0][:2]]
    pair = SamplingParams(temperature=0, max_tokens=3, n=2)
    outs = [o.token_ids for o in cu_llm.generate(prompts[1:], pair)[0].outputs]
    assert outs == [expected[1][:3], expected[1][:3]]

    # one decode-only step: count its launches, and check it reuses the workspace
    engine = cu_llm.engine
    engine.add_request("solo", prompts[0], SamplingParams(temperature=0, max_tokens=3))
    engine.step()  # the prefill
    before, buffers = resident.launches, dict(resident.workspace._buffers)
    engine.step()  # a decode step
    layers = len(model.layers)
    assert resident.launches - before == 2 + 6 * layers + 1, resident.launches - before
    after = resident.workspace._buffers
    assert after.keys() == buffers.keys() and all(after[k] is buffers[k] for k in buffers), (
        "a decode step allocated device memory"
    )
    while engine.has_unfinished_requests():
        engine.step()


def check_resident_qwen2_biases_and_tied_head() -> None:
    """Qwen2's q/k/v biases (added in the fused qkv kernel) and its lm_head tied to the
    embedding table: the resident engine gives ref's greedy tokens."""
    from minillm import LLM, SamplingParams

    t = _helpers()
    folder = str(t._tiny_model_dir("tiny_qwen2_cuda", arch="qwen2"))
    opts = dict(block_size=4, num_kv_blocks=16)
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    tokens = {}
    for backend in ("cuda", "ref"):
        llm = LLM(folder, backend=backend, **opts)
        tokens[backend] = llm.generate("paged attention", greedy)[0].outputs[0].token_ids
        if backend == "cuda":
            assert llm.engine.runner.model.resident is not None
            assert llm.engine.runner.model.layers[0].bq is not None, "the tiny Qwen2 has biases"
    assert tokens["cuda"] == tokens["ref"], tokens


def check_resident_batch_of_256_decodes_and_a_prefill() -> None:
    """One forward of 256 decode rows (one sequence 5 tokens deep, 255 at position 0) plus a
    prefill chunk that continues another sequence, on the quantized tiny model: logits and
    the KV written equal ref's on host caches. Out-of-range ids, slots, blocks and rows are
    refused with their name."""
    from minillm.model.batch import ForwardBatch, PrefillChunk
    from minillm.model.llama import LlamaModel

    t = _helpers()
    cu, ref = t._backends()
    # one layer, d = 32: the simulator costs ~5 us of Python per weight read, and 258 tokens
    # read every weight; a GPU runs the same check on the same shapes
    config, weights, _ = quantized_tiny(
        "tiny_llama_1layer", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    bs, nb = 4, 260
    shape = (nb, bs, config.num_kv_heads, config.head_dim)
    models, caches = {}, {}
    for ops in (cu, ref):
        models[ops.name] = LlamaModel(config, weights, ops)
        caches[ops.name] = [
            [ops.allocate_kv_cache(shape) for _ in range(config.num_layers)] for _ in range(2)
        ]
    g = torch.Generator().manual_seed(24)
    ids = torch.randint(3, config.vocab_size, (300,), generator=g)
    # step 1: prefill A (5 tokens, blocks 0-1) and B (3 tokens, block 2)
    first = ForwardBatch(
        token_ids=ids[:8], positions=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
        slot_mapping=torch.tensor([0, 1, 2, 3, 4, 8, 9, 10]), num_decode=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[PrefillChunk(0, 5, 5, torch.tensor([0, 1])), PrefillChunk(5, 3, 3, torch.tensor([2]))],
        logits_rows=torch.tensor([4, 7]),
    )  # fmt: skip
    # step 2: A decodes at position 5; 255 one-token sequences (blocks 3...) decode at position
    # 0; B's next 2 prompt tokens are a prefill chunk after its 3 cached ones (the second
    # opens B's second block)
    n_new = 255
    tables = torch.zeros(256, 2, dtype=torch.long)
    tables[0] = torch.tensor([0, 1])
    tables[1:, 0] = torch.arange(3, 3 + n_new)
    second = ForwardBatch(
        token_ids=ids[8 : 8 + 258],
        positions=torch.cat([torch.tensor([5]), torch.zeros(n_new, dtype=torch.long), torch.tensor([3, 4])]),
        slot_mapping=torch.cat([torch.tensor([5]), torch.arange(3, 3 + n_new) * bs, torch.tensor([11, (3 + n_new) * bs])]),
        num_decode=256, decode_block_tables=tables,
        decode_context_lens=torch.cat([torch.tensor([6]), torch.ones(n_new, dtype=torch.long)]),
        prefills=[PrefillChunk(256, 2, 5, torch.tensor([2, 3 + n_new]))],
        logits_rows=torch.arange(258),
    )  # fmt: skip
    for batch in (first, second):
        got = models["cuda"].forward(batch, *caches["cuda"])
        expected = models["ref"].forward(batch, *caches["ref"])
        t._close(got, expected, f"logits of {batch.num_tokens} tokens", atol=1e-3)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert models["cuda"].resident is not None
    # bad input is named before any kernel could read out of bounds
    from dataclasses import replace

    bad = [
        (replace(first, token_ids=first.token_ids.clone().fill_(config.vocab_size)), "token ids"),
        (replace(first, slot_mapping=first.slot_mapping + nb * bs), "slots"),
        (replace(second, decode_block_tables=second.decode_block_tables + nb), "decode block ids"),
        (replace(first, logits_rows=torch.tensor([8])), "sampled rows"),
    ]
    for batch, words in bad:
        try:
            models["cuda"].forward(batch, *caches["cuda"])
        except ValueError as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"no error for bad {words}")
    for kc_cu, kc_ref in zip(caches["cuda"][0], caches["ref"][0], strict=True):
        t._close(_host(kc_cu), kc_ref, "k cache after both steps", atol=1e-4)


def quantized_tiny(name: str = "tiny_llama_cuda", **shape: int):  # noqa: ANN201
    """(config, weights, tokenizer) of a tiny random Llama with its matrices in the bundled
    GGUF's formats: Q4_1 layers, Q8_0 embedding, Q4_0 lm_head."""
    from dataclasses import fields, replace

    from minillm.formats.blocks import QuantTensor
    from minillm.loader import read_model_files

    config, weights, tokenizer = read_model_files(_helpers()._tiny_model_dir(name, **shape))

    def quant(x, fmt: str):  # noqa: ANN001, ANN202
        return QuantTensor.from_array(x.dequantize(), fmt) if len(x.shape) == 2 else x

    layers = [
        replace(lw, **{f.name: quant(getattr(lw, f.name), "Q4_1") for f in fields(lw) if getattr(lw, f.name) is not None})
        for lw in weights.layers
    ]  # fmt: skip
    qweights = replace(
        weights,
        embed=quant(weights.embed, "Q8_0"),
        layers=layers,
        lm_head=quant(weights.lm_head, "Q4_0"),
    )
    return config, qweights, tokenizer


RESIDENT_CHECKS = [
    check_fused_matvecs_match_ops,
    check_rope_table_and_rope_store,
    check_resident_engine_matches_ref,
    check_resident_qwen2_biases_and_tied_head,
    check_resident_batch_of_256_decodes_and_a_prefill,
]
