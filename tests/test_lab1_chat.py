"""Lab 1 (streaming chat), tested three ways on the bundled model.

1. `chat_stream` directly: the prompt the engine received is the chat template of the expected
   conversation, the streamed answer equals a batch `llm.chat` answer, the stats line carries
   the engine's own numbers, and closing the stream aborts the request.
2. The launched app through `gradio_client`: partial answers arrive one by one on `/chat`, and
   cancelling a job aborts its engine request.
3. A real browser (Debian chromium + playwright) types a message, sees the streamed answer with
   its stats line, presses Stop on a long answer, and saves screenshots under tmp_path.

References are always computed with the engine's batch API, never copied from an output.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import closing

import gradio as gr
import pytest

from labs.lab1_chat.app import build_demo
from minillm import LLM, SamplingParams
from minillm.ui.chat import DEFAULT_SYSTEM_PROMPT, chat_stream, engine_lock, history_to_messages

STATS = re.compile(
    r"\*(?P<tokens>\d+) tokens? · (?P<rate>[0-9.]+) tokens/s · TTFT (?P<ttft>[0-9.]+) s(?P<rest>[^*]*)\*$"
)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llm(bundled_gguf_path) -> LLM:
    return LLM(str(bundled_gguf_path))


@pytest.fixture(scope="module")
def app_url(llm, free_port):
    """The lab's app on the shared model, served on a free loopback port for the module."""
    with pytest.MonkeyPatch.context() as mp:
        # Loopback traffic (gradio_client) must never go through a proxy from the environment.
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        demo = build_demo(llm)
        _, url, _ = demo.launch(
            server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
        )
        yield url
        demo.close()


def greedy_reference(llm: LLM, messages: list[dict], max_tokens: int = MAX_TOKENS):
    """The batch engine's greedy answer, taken under the lock so no chat runs meanwhile."""
    with engine_lock(llm):
        return llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]


def is_idle(llm: LLM) -> bool:
    """No request is in the engine and the chat lock is free."""
    lock = engine_lock(llm)
    if llm.engine.has_unfinished_requests() or not lock.acquire(blocking=False):
        return False
    lock.release()
    return True


def wait_until_idle(llm: LLM, seconds: float = 120.0) -> bool:
    """True as soon as the app's worker thread has let go of the engine (a cancel travels
    through HTTP and Gradio's queue first). The limit only bounds a failure: on a loaded
    2-core machine that hand-over can take seconds."""
    deadline = time.monotonic() + seconds
    while not is_idle(llm):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class StreamSpy:
    """Passes LLM.stream through unchanged and remembers what the engine reported."""

    def __init__(self, llm: LLM) -> None:
        self.real = llm.stream
        self.outputs = []

    def __call__(self, prompt, params=None):
        with closing(self.real(prompt, params)) as outputs:
            for out in outputs:
                self.outputs.append(out)
                yield out


# ---- 1. the chat function ---------------------------------------------------------------------


def test_history_in_gradio6_formats_becomes_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!\n\n*3 tokens · 12.5 tokens/s · TTFT 0.20 s*"},
        {"role": "assistant", "content": "thinking", "metadata": {"title": "Thought"}},
        {"role": "user", "content": "Line 1"},
    ]
    assert history_to_messages("Next?", history, "Be kind.") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Line 1"},
        {"role": "user", "content": "Next?"},
    ]
    assert history_to_messages("Q", None, "  ") == [{"role": "user", "content": "Q"}]
    assert history_to_messages("Q", [gr.ChatMessage(content="A", role="assistant")]) == [
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q"},
    ]
    with pytest.raises(ValueError, match="empty"):
        history_to_messages("  ", [])
    with pytest.raises(ValueError, match="role 'robot'"):
        history_to_messages("Q", [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="text-only.*'file'"):
        history_to_messages("Q", [{"role": "user", "content": [{"type": "file", "file": {}}]}])
    with pytest.raises(TypeError, match="message must be a str"):
        history_to_messages(42, [])


def test_multi_turn_chat_goes_through_the_template(llm, monkeypatch):
    spy = StreamSpy(llm)
    monkeypatch.setattr(llm, "stream", spy)
    history = [
        {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
        {
            "role": "assistant",
            "content": "Nice to meet you, Ada!\n\n*7 tokens · 9.9 tokens/s · TTFT 0.31 s*",
        },
    ]
    partials = list(chat_stream(llm, "What is my name?", history, "Be brief.", 0.0, 1.0, 8))

    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    prompt = llm.apply_chat_template(expected)
    final = spy.outputs[-1]
    assert final.prompt == prompt
    assert final.prompt_token_ids == llm.tokenizer.encode(prompt)

    answer, _, stats = partials[-1].rpartition("\n\n")
    reference = greedy_reference(llm, expected, 8)
    assert answer == reference.outputs[0].text != ""
    assert partials[:-1] == [
        "".join(o.outputs[0].text for o in spy.outputs[: i + 1])
        for i in range(len(spy.outputs))
        if spy.outputs[i].outputs[0].text
    ]
    match = STATS.fullmatch(stats)
    assert match, stats
    m = final.metrics
    assert int(match["tokens"]) == m.num_generation_tokens == len(reference.outputs[0].token_ids)
    assert float(match["ttft"]) == pytest.approx(m.ttft, abs=0.006)
    assert float(match["rate"]) == pytest.approx(
        (m.num_generation_tokens - 1) / m.eval_duration, abs=0.06
    )


def test_max_tokens_is_respected(llm, monkeypatch):
    spy = StreamSpy(llm)
    monkeypatch.setattr(llm, "stream", spy)
    *_, last = chat_stream(llm, "Write a long story about a dragon.", [], "", 0.0, 1.0, 5)
    final = spy.outputs[-1]
    assert final.outputs[0].finish_reason == "length"
    assert final.metrics.num_generation_tokens == 5
    assert sum(len(o.outputs[0].token_ids) for o in spy.outputs) == 5
    match = STATS.fullmatch(last.rpartition("\n\n")[2])
    assert match and match["tokens"] == "5" and "max_tokens reached" in match["rest"]


def test_bad_settings_raise_before_anything_is_queued(llm):
    with pytest.raises(ValueError, match="temperature"):
        chat_stream(llm, "Hi", [], "", -1.0, 1.0, 8)
    with pytest.raises(ValueError, match="top_p"):
        chat_stream(llm, "Hi", [], "", 0.5, 0.0, 8)
    assert not llm.engine.has_unfinished_requests()


def test_closing_the_stream_aborts_the_engine_request(llm):
    aborted = llm.engine.stats.finished_requests.get("abort", 0)
    with closing(
        chat_stream(llm, "Write a long story about a dragon.", [], "", 0.0, 1.0, 200)
    ) as s:
        first = next(s)
        assert first and llm.engine.has_unfinished_requests()
    # close() runs in this thread: the abort and the lock's release are done when it returns.
    assert llm.engine.stats.finished_requests.get("abort", 0) == aborted + 1
    assert is_idle(llm)


def test_concurrent_chats_are_serialised(llm):
    questions = ["Name a colour.", "Name a fruit."]
    results: dict[str, str] = {}

    def ask(question: str) -> None:
        *_, last = chat_stream(llm, question, [], "", 0.0, 1.0, 6)
        results[question] = last.rpartition("\n\n")[0]

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for q in questions:
        expected = greedy_reference(llm, [{"role": "user", "content": q}], 6).outputs[0].text
        assert results.get(q) == expected


# ---- 2. the running app through gradio_client -------------------------------------------------


def test_app_streams_partial_answers_over_the_api(llm, app_url):
    from gradio_client import Client

    history = [
        {"role": "user", "content": "Hi, I am Bob."},
        {"role": "assistant", "content": "Hello Bob!"},
    ]
    message = "What is the capital of France?"
    expected = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        *history,
        {"role": "user", "content": message},
    ]
    reference = greedy_reference(llm, expected).outputs[0].text

    client = Client(app_url, verbose=False)
    job = client.submit(
        message, history, DEFAULT_SYSTEM_PROMPT, 0.0, 1.0, MAX_TOKENS, api_name="/chat"
    )
    outputs = list(job)  # every message the app sent, in order (gradio_client keeps them all)

    *partials, final = outputs
    assert len(set(partials)) > 1, outputs
    assert all(b.startswith(a) for a, b in zip(partials, partials[1:], strict=False))
    answer, _, stats = final.rpartition("\n\n")
    assert answer == reference == partials[-1]
    assert STATS.fullmatch(stats), final


def test_cancelling_an_api_job_aborts_the_engine_request(llm, app_url):
    from gradio_client import Client

    aborted = llm.engine.stats.finished_requests.get("abort", 0)
    client = Client(app_url, verbose=False)
    job = client.submit(
        "Write a long story about a dragon.", [], "", 0.0, 1.0, 300, api_name="/chat"
    )
    deadline = time.monotonic() + 120  # bounds a failure only; returns at the first partial
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.outputs(), "no partial answer arrived"
    job.cancel()
    assert wait_until_idle(llm)
    assert llm.engine.stats.finished_requests.get("abort", 0) == aborted + 1
    assert "tokens/s" not in job.outputs()[-1]


# ---- 3. a real browser ------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_chat_and_stop(llm, app_url, chromium_path, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    message = "What is the capital of France?"
    reference = (
        greedy_reference(
            llm,
            [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": message},
            ],
        )
        .outputs[0]
        .text
    )
    spy = StreamSpy(llm)
    monkeypatch.setattr(llm, "stream", spy)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(chromium_path),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--no-proxy-server",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(app_url)
            set_number(page, "temperature", "0")
            set_number(page, "max-tokens", str(MAX_TOKENS))
            box = page.locator("#message textarea")
            box.fill(message)
            box.press("Enter")

            bot = page.locator("#chatbot .message.bot").last
            expect(bot).to_contain_text("tokens/s", timeout=90_000)
            expect(page.locator("#chatbot .message.user").last).to_contain_text(message)
            assert " ".join(reference.split()) in " ".join(bot.inner_text().split())
            page.screenshot(path=str(tmp_path / "lab1_chat_answer.png"), full_page=True)

            set_number(page, "max-tokens", "300")
            answered = len(spy.outputs)
            box.fill("Write a long story about a dragon.")
            box.press("Enter")
            # Stop only once the answer is streaming: a pending bubble may show before that.
            first_words = wait_for_text(spy, answered)
            expect(page.locator("#chatbot .message.bot").nth(1)).to_contain_text(first_words)
            expect(box).not_to_be_editable()  # no new message while an answer streams
            page.get_by_role("button", name="Stop").click()
            assert wait_until_idle(llm)
            expect(box).to_be_editable()
            second_prompt = spy.outputs[-1].prompt
            stopped = page.locator("#chatbot .message.bot").last.inner_text()
            assert stopped.strip() and "tokens/s" not in stopped
            page.screenshot(path=str(tmp_path / "lab1_chat_stopped.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "lab1_chat_answer.png").stat().st_size > 10_000
    # The second turn's prompt holds the first turn, the answer without its stats line.
    assert second_prompt == llm.apply_chat_template(
        [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": message},
            {"role": "assistant", "content": reference},
            {"role": "user", "content": "Write a long story about a dragon."},
        ]
    )


def wait_for_text(spy: StreamSpy, seen: int, seconds: float = 90.0) -> str:
    """The first non-empty text the engine streams after the spy's first `seen` outputs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        texts = [o.outputs[0].text.strip() for o in spy.outputs[seen:]]
        if any(texts):
            return next(t for t in texts if t)
        time.sleep(0.05)
    raise AssertionError("the engine streamed nothing")


def set_number(page, elem_id: str, value: str) -> None:
    """Type into the number box of a Gradio slider, as a user would."""
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(value)
    field.press("Enter")


def test_gemma3_base_model_continues_the_text(gemma3_gguf_path):
    """Lab 1 on Gemma 3 270M (--model gemma3-270m): a base model gets the conversation's text
    to continue, not a chat turn; the streamed answer is LLM.generate's greedy continuation of
    the same text (system prompt left out)."""
    from minillm.chat import is_base_model
    from minillm.ui.chat import strip_stats

    gemma = LLM(str(gemma3_gguf_path), backend="cpu")
    assert is_base_model(gemma.loaded)
    *_, last = chat_stream(gemma, "北京是中国的", [], "You are helpful.", 0.0, 1.0, 8)
    want = gemma.generate(["北京是中国的"], SamplingParams(temperature=0, max_tokens=8))
    assert strip_stats(last).strip() == want[0].outputs[0].text.strip()
    assert build_demo(gemma, model="gemma3-270m") is not None
    with pytest.raises(ValueError, match="unknown model 'llama'"):
        build_demo(gemma, model="llama")
