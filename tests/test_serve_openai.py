"""The OpenAI-compatible API, driven by the real `openai` SDK (sync, async, streaming) against a
live server on a free loopback port.

References come from a second LLM on the same weights, driven offline (`LLM.generate`), so
every answer the server gives is checked against the engine's own batch API; embeddings are
checked against Hugging Face transformers. One real-answer check runs the bundled model.
"""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model

KEY = "sk-test-openai"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=3)


@pytest.fixture(scope="module")
def ref(tiny_dir) -> LLM:
    """The reference: same weights, its own engine, never touched by the server."""
    return LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def server(tiny_dir, free_port):
    llm = LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")
    app = build_app(llm, api_key=KEY, served_model_name=[MODEL, "tiny-alias"])
    with run_in_thread(app, port=free_port()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def ref_chat(ref: LLM, messages, **params):
    return ref.chat(messages, SamplingParams(**params))[0]


# ---------------------------------------------------------------------------- models
def test_models_lists_every_served_name(client, ref):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "tiny-alias"]
    assert models[0].max_model_len == ref.engine.max_model_len


# ---------------------------------------------------------------------------- chat
def test_chat_greedy_equals_the_engine_and_reports_usage(client, ref):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
    expected = ref_chat(ref, HELLO, temperature=0, max_tokens=10)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    prompt_ids = ref.tokenizer.encode(ref.apply_chat_template(HELLO))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_alias_name_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="tiny-alias",
        messages=HELLO,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.model == "tiny-alias"
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streaming_chat_matches_the_whole_answer(client, ref):
    expected = ref_chat(ref, HELLO, temperature=0, max_tokens=12, ignore_eos=True)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == expected.outputs[0].text
    reasons = [c.choices[0].finish_reason for c in content]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_and_sampling_extras_follow_the_engine(client, ref):
    base = ref_chat(ref, HELLO, temperature=0, max_tokens=12, ignore_eos=True).outputs[0].text
    stop = base[4:6]
    assert stop.strip(), f"pick another slice of {base!r}"
    params = dict(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        stop=[stop],
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    expected = ref_chat(ref, HELLO, **params).outputs[0]
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.3},
    )
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason == "stop"
    assert stop not in r.choices[0].message.content


def test_seeded_sampling_is_reproducible_and_matches_the_engine(client, ref):
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=8)
    extra = {"top_k": 50, "min_p": 0.01, "ignore_eos": True}
    a = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, **kwargs, extra_body=extra)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, **kwargs, extra_body=extra)
    expected = ref_chat(ref, HELLO, n=2, top_k=50, min_p=0.01, ignore_eos=True, **kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts == [o.text for o in expected.outputs]
    assert a.usage.completion_tokens == 16


def test_logprobs_are_the_engines(client, ref):
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    expected = ref_chat(ref, HELLO, temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = expected.outputs[0]
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 5
    for entry, tid, lp in zip(entries, out.token_ids, out.logprobs, strict=True):
        assert entry.token == ref.tokenizer.decode([tid])
        assert entry.logprob == pytest.approx(lp[tid], abs=1e-5)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(max(lp.values()), abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


# ---------------------------------------------------------------------------- completions
def test_completions_batch_of_prompts_with_n(client, ref):
    prompts = ["Large language models", "def add(a, b):"]
    params = dict(temperature=0.8, seed=7, max_tokens=6, n=2, ignore_eos=True)
    r = client.completions.create(
        model=MODEL,
        prompt=prompts,
        temperature=0.8,
        seed=7,
        max_tokens=6,
        n=2,
        extra_body={"ignore_eos": True},
    )
    expected = ref.generate(prompts, SamplingParams(**params))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [o.text for e in expected for o in e.outputs]
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert r.usage.completion_tokens == 24


def test_completions_stream_echo_and_token_prompts(client, ref):
    prompt = "Paged attention"
    expected = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        stream=True,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == prompt + expected[0].outputs[0].text
    ids = ref.tokenizer.encode(prompt)
    r = client.completions.create(
        model=MODEL,
        prompt=ids,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == expected[0].outputs[0].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


# ---------------------------------------------------------------------------- async clients
def test_async_clients_batch_together_and_each_gets_its_solo_answer(server, ref):
    questions = [
        [{"role": "user", "content": f"Question number {i}: what is a KV cache?"}] for i in range(6)
    ]
    expected = [
        ref_chat(ref, q, temperature=0, max_tokens=8 + i, ignore_eos=True).outputs[0].text
        for i, q in enumerate(questions)
    ]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY) as aclient:

            async def ask(i, q):
                if i % 2:  # half of them stream
                    stream = await aclient.chat.completions.create(
                        model=MODEL,
                        messages=q,
                        max_tokens=8 + i,
                        temperature=0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    return "".join(
                        [c.choices[0].delta.content or "" async for c in stream if c.choices]
                    )
                r = await aclient.chat.completions.create(
                    model=MODEL,
                    messages=q,
                    max_tokens=8 + i,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                return r.choices[0].message.content

            return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))

    assert asyncio.run(main()) == expected


# ---------------------------------------------------------------------------- embeddings
def test_embeddings_are_mean_pooled_hidden_states(client, tiny_dir, ref):
    import transformers

    texts = ["The quick brown fox", "KV cache and paged attention"]
    r = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    hf = transformers.AutoModel.from_pretrained(tiny_dir, dtype=torch.float32)
    assert r.usage.prompt_tokens == sum(len(ref.tokenizer.encode(t)) for t in texts)
    for text, item, item_f in zip(texts, r.data, floats.data, strict=True):
        ids = torch.tensor([ref.tokenizer.encode(text)])
        with torch.no_grad():
            hidden = hf(ids).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        got = torch.tensor(item.embedding)
        assert got.shape == (ref.config.hidden_size,)
        assert torch.allclose(got, expected, atol=1e-5)
        assert math.isclose(float(got.norm()), 1.0, rel_tol=1e-5)
        assert torch.allclose(torch.tensor(item_f.embedding), got, atol=1e-6)


# ---------------------------------------------------------------------------- the bundled model
def test_bundled_model_answers_for_real(bundled_gguf_path, free_port):
    llm = LLM(str(bundled_gguf_path), backend="ref")
    with run_in_thread(build_app(llm, served_model_name="smollm2"), port=free_port()) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
    assert "Paris" in r.choices[0].message.content


# ---------------------------------------------------------------------------- the CLI
def test_minillm_serve_command_line(tiny_dir, free_port, tmp_path):
    """`minillm serve` as a user runs it: a real process, vLLM's flag names reach the engine."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "MINILLM_HOME": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "minillm.cli",
        "serve",
        str(tiny_dir),
        "--port",
        str(port),
        "--api-key",
        "sk-cli",
        "--served-model-name",
        "cli-tiny",
        "--backend",
        "ref",
        "--max-model-len",
        "128",
        "--block-size",
        "8",
        "--kv-cache-memory",
        "1MiB",
        "--max-num-seqs",
        "4",
        "--no-enable-prefix-caching",
        "--threads",
        "1",
        "--log-level",
        "warning",
        "--max-body-size",
        "2KiB",
        "--max-n",
        "2",
        "--allowed-origins",
        "https://a.example,https://b.example",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer sk-cli"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "minillm serve did not come up"
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("cli-tiny", 128)]
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"model": "cli-tiny", "prompt": "the same long prompt, twice " * 2, "max_tokens": 3}
        for _ in range(2):
            assert httpx.post(url + "/v1/completions", json=body, headers=auth).status_code == 200
        big = {**body, "prompt": "x" * 3000}
        r = httpx.post(url + "/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and "at most 2 KiB" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "n": 3}, headers=auth)
        assert r.status_code == 400 and "at most 2 completions" in r.json()["error"]["message"]
        for origin, status in (("https://b.example", 200), ("https://c.example", 403)):
            r = httpx.post(url + "/v1/completions", json=body, headers={**auth, "origin": origin})
            assert r.status_code == status, (origin, r.text)
        assert httpx.get(url + "/metrics").status_code == 401  # the key guards it too
        metrics = httpx.get(url + "/metrics", headers=auth).text
        assert 'vllm:prefix_cache_hits_total{model_name="cli-tiny"} 0.0' in metrics
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving cli-tiny at http://127.0.0.1:" in out
    assert "KV blocks of 8 tokens, max_model_len 128" in out
