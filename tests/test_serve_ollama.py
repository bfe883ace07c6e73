"""The Ollama-compatible API over httpx: NDJSON streams, final chunks, options, model info.

Answers are checked against a second LLM on the same weights (the engine's batch API) with the
sampling parameters Ollama's defaults and options stand for; embeddings against /v1/embeddings
and transformers (through the OpenAI test's reference), timings against each other.
"""

from __future__ import annotations

import json

import httpx
import pytest

from minillm import LLM, SamplingParams, __version__
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model

MODEL = "tiny:latest"
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
# Ollama's defaults; greedy decoding ignores top_k / top_p, not the repeat penalty
OLLAMA_GREEDY = dict(temperature=0.0, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=5)


@pytest.fixture(scope="module")
def ref(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def url(tiny_dir, free_port):
    llm = LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")
    with run_in_thread(build_app(llm, served_model_name=MODEL), port=free_port()) as srv:
        yield srv.url


def ndjson(url: str, path: str, body: dict) -> list[dict]:
    """POST and read the NDJSON stream line by line, as Ollama's clients do."""
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def check_final(final: dict, prompt_tokens: int, generated: int) -> None:
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["prompt_eval_count"] == prompt_tokens
    assert final["eval_count"] == generated
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0


# ---------------------------------------------------------------------------- /api/chat
def test_chat_streams_ndjson_by_default(url, ref):
    expected = ref.chat(CHAT, SamplingParams(max_tokens=10, **OLLAMA_GREEDY))[0].outputs[0]
    lines = ndjson(
        url,
        "/api/chat",
        {"model": MODEL, "messages": CHAT, "options": {"temperature": 0, "num_predict": 10}},
    )
    *pieces, final = lines
    assert len(pieces) >= 2
    assert all(p["done"] is False and p["message"]["role"] == "assistant" for p in pieces)
    assert all(p["model"] == MODEL and p["created_at"].endswith("Z") for p in lines)
    assert "".join(p["message"]["content"] for p in pieces) == expected.text
    assert final["message"]["content"] == ""
    assert final["done_reason"] == expected.finish_reason
    prompt = len(ref.tokenizer.encode(ref.apply_chat_template(CHAT)))
    check_final(final, prompt, len(expected.token_ids))


def test_chat_without_streaming_applies_ollama_defaults(url, ref):
    expected = ref.chat(CHAT, SamplingParams(max_tokens=12, **OLLAMA_GREEDY))[0].outputs[0]
    r = httpx.post(
        url + "/api/chat",
        json={
            "model": MODEL,
            "messages": CHAT,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 12},
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["done"] is True
    assert body["message"] == {"role": "assistant", "content": expected.text}
    assert body["done_reason"] == expected.finish_reason
    assert body["eval_count"] == len(expected.token_ids)


def test_options_map_to_sampling_params(url, ref):
    options = {
        "temperature": 0.7,
        "top_k": 30,
        "top_p": 0.8,
        "min_p": 0.02,
        "repeat_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.2,
        "seed": 42,
        "num_predict": 9,
    }
    params = SamplingParams(
        temperature=0.7,
        top_k=30,
        top_p=0.8,
        min_p=0.02,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        seed=42,
        max_tokens=9,
    )
    expected = ref.chat(CHAT, params)[0].outputs[0].text
    bodies = [
        httpx.post(
            url + "/api/chat",
            json={"model": MODEL, "messages": CHAT, "stream": False, "options": options},
        ).json()
        for _ in range(2)
    ]
    assert bodies[0]["message"]["content"] == bodies[1]["message"]["content"] == expected


def test_stop_option_ends_the_answer(url, ref):
    long = ref.chat(CHAT, SamplingParams(max_tokens=12, ignore_eos=True, **OLLAMA_GREEDY))
    text = long[0].outputs[0].text
    stop = text[3:5]
    assert stop.strip(), f"pick another slice of {text!r}"
    expected = ref.chat(CHAT, SamplingParams(max_tokens=12, stop=[stop], **OLLAMA_GREEDY))[0]
    body = httpx.post(
        url + "/api/chat",
        json={
            "model": MODEL,
            "messages": CHAT,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 12, "stop": [stop]},
        },
    ).json()
    assert body["message"]["content"] == expected.outputs[0].text
    assert body["done_reason"] == "stop" and stop not in body["message"]["content"]


def test_num_ctx_caps_prompt_and_answer(url, ref):
    prompt_len = len(ref.tokenizer.encode(ref.apply_chat_template(CHAT)))
    body = httpx.post(
        url + "/api/chat",
        json={
            "model": MODEL,
            "messages": CHAT,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 100, "num_ctx": prompt_len + 3},
        },
    ).json()
    assert body["eval_count"] <= 3
    r = httpx.post(
        url + "/api/chat",
        json={"model": MODEL, "messages": CHAT, "options": {"num_ctx": prompt_len - 1}},
    )
    assert r.status_code == 400 and f"{prompt_len} tokens" in r.json()["error"]


# ---------------------------------------------------------------------------- /api/generate
def test_generate_streams_and_returns_context(url, ref):
    prompt = "Tell me about paged attention."
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    text_prompt = ref.apply_chat_template(messages)
    expected = ref.generate(text_prompt, SamplingParams(max_tokens=8, **OLLAMA_GREEDY))[0]
    lines = ndjson(
        url,
        "/api/generate",
        {
            "model": MODEL,
            "prompt": prompt,
            "system": "Be brief.",
            "options": {"temperature": 0, "num_predict": 8},
        },
    )
    *pieces, final = lines
    assert "".join(p["response"] for p in pieces) == expected.outputs[0].text
    assert final["response"] == ""
    assert final["context"] == expected.prompt_token_ids + expected.outputs[0].token_ids
    check_final(final, len(expected.prompt_token_ids), len(expected.outputs[0].token_ids))


def test_generate_raw_skips_the_template(url, ref):
    prompt = "def add(a, b):"
    expected = ref.generate(prompt, SamplingParams(max_tokens=6, **OLLAMA_GREEDY))[0]
    body = httpx.post(
        url + "/api/generate",
        json={
            "model": MODEL,
            "prompt": prompt,
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 6},
        },
    ).json()
    assert body["response"] == expected.outputs[0].text
    assert body["prompt_eval_count"] == len(ref.tokenizer.encode(prompt))
    assert "context" not in body


def test_empty_prompt_or_messages_just_load_the_model(url):
    g = httpx.post(url + "/api/generate", json={"model": MODEL}).json()
    c = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": []}).json()
    assert g["done"] is True and g["done_reason"] == "load" and g["response"] == ""
    assert c["done_reason"] == "load" and c["message"]["content"] == ""


# ---------------------------------------------------------------------------- model info
def test_tags_show_ps_version(url, ref):
    tags = httpx.get(url + "/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [MODEL]
    details = tags[0]["details"]
    assert details["format"] == "hf" and details["family"] == "llama"
    assert tags[0]["size"] > 0 and len(tags[0]["digest"]) == 64

    show = httpx.post(url + "/api/show", json={"model": "tiny"}).json()  # ":latest" implied
    info = show["model_info"]
    assert info["llama.context_length"] == ref.config.max_position_embeddings
    assert info["llama.block_count"] == ref.config.num_layers
    assert info["general.parameter_count"] == ref.config.num_params
    assert show["template"] == ref.loaded.chat_template.source
    assert show["modelfile"].startswith("FROM ")

    ps = httpx.get(url + "/api/ps").json()["models"][0]
    assert ps["name"] == MODEL and ps["context_length"] == ref.engine.max_model_len
    assert ps["size"] > tags[0]["size"]  # weights plus the KV cache
    assert httpx.get(url + "/api/version").json() == {"version": __version__}


def test_embed_matches_openai_embeddings(url, ref):
    texts = ["hello world", "KV cache"]
    body = httpx.post(url + "/api/embed", json={"model": MODEL, "input": texts}).json()
    oa = httpx.post(
        url + "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"}
    ).json()
    assert body["embeddings"] == [d["embedding"] for d in oa["data"]]
    assert body["prompt_eval_count"] == sum(len(ref.tokenizer.encode(t)) for t in texts)
    single = httpx.post(url + "/api/embed", json={"model": MODEL, "input": "hello world"}).json()
    assert single["embeddings"] == body["embeddings"][:1]


def test_embed_truncates_unless_told_not_to(url, ref):
    long_text = "token " * (ref.engine.max_model_len + 20)
    ok = httpx.post(url + "/api/embed", json={"model": MODEL, "input": long_text})
    assert ok.status_code == 200 and ok.json()["prompt_eval_count"] == ref.engine.max_model_len
    bad = httpx.post(
        url + "/api/embed", json={"model": MODEL, "input": long_text, "truncate": False}
    )
    assert bad.status_code == 400 and "truncate" in bad.json()["error"]


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/api/chat", {"model": "nope", "messages": CHAT}, 404, "'nope' does not exist"),
        ("/api/chat", {"messages": CHAT}, 400, "model is required"),
        (
            "/api/chat",
            {"model": MODEL, "messages": CHAT, "options": {"temperature": "hot"}},
            400,
            "options.temperature",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": CHAT, "options": {"bogus": 1}},
            400,
            "unknown parameter 'bogus'",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": CHAT, "options": {"num_predict": 0}},
            400,
            "num_predict",
        ),
        ("/api/chat", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "no 'role'"),
        ("/api/chat", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": "json"}, 400, "format"),
        ("/api/generate", {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("/api/show", {"model": "nope"}, 404, "'nope' does not exist"),
    ],
)
def test_errors_are_ollama_shaped(url, path, body, status, needle):
    r = httpx.post(url + path, json=body)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and needle in r.json()["error"]


def test_malformed_json_from_curl(url):
    # `curl -d` sends application/x-www-form-urlencoded; the body is read as JSON anyway
    headers = {"content-type": "application/x-www-form-urlencoded"}
    ok = httpx.post(
        url + "/api/generate",
        headers=headers,
        content=json.dumps(
            {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        ),
    )
    assert ok.status_code == 200 and ok.json()["done"] is True
    bad = httpx.post(url + "/api/generate", headers=headers, content=b'{"model": ')
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
