"""Lab 2 (chat with any OpenAI-compatible server) against a minillm server started here.

1. `stream_chat` with the openai SDK: the answer equals the engine's own greedy answer to the
   conversation the lab builds, and the stats line carries the server's token count.
2. The launched Gradio app through `gradio_client`: `/chat` streams partial answers, and a
   server error reaches the caller as a readable message.
"""

from __future__ import annotations

import re

import openai
import pytest

from labs.lab2_api_chat.app import build_demo, stats_line, stream_chat
from minillm import LLM, SamplingParams
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model
from minillm.ui.chat import STATS_LINE, strip_stats

KEY = "sk-lab2"
STATS = re.compile(r"\*(?P<tokens>\d+) tokens? · (?P<rate>[0-9.]+) tokens/s · TTFT [0-9.]+ s.*\*")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=19)


@pytest.fixture(scope="module")
def ref(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def server(tiny_dir, free_port):
    llm = LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")
    with run_in_thread(
        build_app(llm, api_key=KEY, served_model_name="tiny"), port=free_port()
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def app_url(server, free_port):
    demo = build_demo(base_url=server.url + "/v1", api_key=KEY)  # model: the server's first
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
    )
    yield url
    demo.close()


def greedy(ref: LLM, messages: list[dict], max_tokens: int):
    return ref.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0]


def test_stats_line_is_lab1s_format():
    line = stats_line(tokens=9, ttft=0.5, total=2.5, finish_reason="length")
    assert STATS_LINE.search("answer\n\n" + line)
    assert line == "*9 tokens · 4.0 tokens/s · TTFT 0.50 s · max_tokens reached*"
    assert strip_stats("answer\n\n" + line) == "answer"


def test_stream_chat_through_the_sdk(server, ref):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    history = [
        {"role": "user", "content": "Hi, I am Bob."},
        {"role": "assistant", "content": "Hello Bob!\n\n*3 tokens · 9.0 tokens/s · TTFT 0.10 s*"},
    ]
    parts = list(stream_chat(client, "tiny", "Who am I?", history, "Be brief.", 0.0, 1.0, 10))
    expected = greedy(
        ref,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi, I am Bob."},
            {"role": "assistant", "content": "Hello Bob!"},
            {"role": "user", "content": "Who am I?"},
        ],
        10,
    )
    *partials, final = parts
    answer, _, stats = final.rpartition("\n\n")
    assert answer == expected.text == partials[-1]
    assert all(b.startswith(a) for a, b in zip(partials, partials[1:], strict=False))
    match = STATS.fullmatch(stats)
    assert match and int(match["tokens"]) == len(expected.token_ids)


def test_gradio_api_streams_partial_answers(app_url, ref):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = client.submit("Tell me about KV caches.", [], "", 0.0, 1.0, 12, api_name="/chat")
    outputs = list(job)
    *partials, final = outputs
    expected = greedy(ref, [{"role": "user", "content": "Tell me about KV caches."}], 12)
    assert len(set(partials)) > 1
    assert final.rpartition("\n\n")[0] == expected.text
    assert STATS.fullmatch(final.rpartition("\n\n")[2])


def test_gradio_api_reports_server_errors(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="404.*'nope' does not exist"):
        client.predict("hi", [], "", 0.5, 1.0, 8, "nope", api_name="/chat")
    with pytest.raises(Exception, match="400.*temperature"):
        client.predict("hi", [], "", -1.0, 1.0, 8, api_name="/chat")
