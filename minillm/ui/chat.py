"""A streaming chat UI on one LLM: the plain chat generator, and the Gradio app factory for labs.

`chat_stream` is ordinary Python (no Gradio): it turns a Gradio-style history into messages,
streams the engine's deltas as a growing answer, and ends with a stats line measured by the
engine. `build_chat_app` wires it into a Gradio 6 `Blocks` (imported lazily, so the engine does
not depend on Gradio) with a Stop button and a named `/chat` API endpoint.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

from minillm.chat import continuation, is_base_model
from minillm.sampling import SamplingParams

if TYPE_CHECKING:
    import gradio as gr

    from minillm.engine.outputs import RequestMetrics, RequestOutput
    from minillm.llm import LLM

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
CHAT_API_NAME = "chat"
ENGINE_CONCURRENCY_ID = "minillm-engine"

# The stats line ends every finished answer, e.g. "*42 tokens · 18.3 tokens/s · TTFT 0.12 s*".
# It is display-only: it is cut off again before the answer goes back into the prompt.
STATS_LINE = re.compile(r"\n*\*\d+ tokens? · [0-9.]+ tokens/s · TTFT [0-9.]+ s[^*\n]*\*\s*\Z")


# ---- one engine, one request at a time --------------------------------------------------------

_ENGINE_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_ENGINE_LOCKS_GUARD = threading.Lock()


def engine_lock(llm: LLM) -> threading.Lock:
    """The lock that serialises every chat on `llm`.

    Why: `LLM.stream` drives `LLMEngine.step()` itself and drops the outputs of other requests,
    and the engine is not thread-safe. Two chats streaming at once from two threads (two browser
    tabs, two API clients) would corrupt the scheduler or starve each other. So one chat runs
    at a time and the others wait; the async server engine will batch them instead.
    """
    with _ENGINE_LOCKS_GUARD:
        lock = _ENGINE_LOCKS.get(llm)
        if lock is None:
            lock = _ENGINE_LOCKS[llm] = threading.Lock()
        return lock


class LazyLLM:
    """Load the model on first use and keep it: one LLM per app, however many users come."""

    def __init__(self, factory: Callable[[], LLM]) -> None:
        self._factory = factory
        self._llm: LLM | None = None
        self._guard = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def get(self) -> LLM:
        if self._llm is None:
            with self._guard:  # two first users must not load the model twice
                if self._llm is None:
                    self._llm = self._factory()
        return self._llm


# ---- Gradio history -> messages -----------------------------------------------------------------


def strip_stats(text: str) -> str:
    """An answer without the stats line this module appended to it."""
    return STATS_LINE.sub("", text)


def content_text(content: Any, where: str = "content") -> str:
    """The text of one message's content: a str, a text part, or a list of parts (Gradio 6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        kind = content.get("type", "text")
        if kind == "text" and isinstance(content.get("text"), str):
            return content["text"]
        raise ValueError(f"{where}: this chat is text-only, got a {kind!r} part")
    if isinstance(content, Sequence):
        return "\n".join(content_text(part, f"{where}[{i}]") for i, part in enumerate(content))
    raise TypeError(f"{where} must be a str or a list of parts, got {type(content).__name__}")


def history_to_messages(
    message: str, history: Sequence[Any] | None, system_prompt: str = ""
) -> list[dict[str, str]]:
    """The conversation the model sees: system prompt, earlier turns, then the new message.

    `history` is Gradio 6's messages format: dicts (or `gr.ChatMessage`s) with "role" and
    "content". Thought bubbles (messages with a metadata title) are UI-only and skipped; stats
    lines are removed from answers, since the model never wrote them.
    """
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, got {type(message).__name__}")
    if not message.strip():
        raise ValueError("message is empty: type something to send")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for i, turn in enumerate(history or []):
        get = turn.get if isinstance(turn, Mapping) else lambda key, t=turn: getattr(t, key, None)
        role, metadata = get("role"), get("metadata")
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"history[{i}] has role {role!r}; expected user, assistant or system")
        if metadata and metadata.get("title"):
            continue
        text = content_text(get("content"), f"history[{i}].content")
        messages.append(
            {"role": role, "content": strip_stats(text) if role == "assistant" else text}
        )
    messages.append({"role": "user", "content": message})
    return messages


# ---- streaming --------------------------------------------------------------------------------


def decode_rate(metrics: RequestMetrics) -> float:
    """Generated tokens per second after the first token (what Ollama calls the eval rate).

    The first token's time is prompt processing (TTFT); counting it would mix two speeds.
    A one-token answer has no decode phase, so its rate covers the whole request.
    """
    n = metrics.num_generation_tokens
    decode = metrics.eval_duration
    if n > 1 and decode and decode > 0:
        return (n - 1) / decode
    if metrics.finished_time is not None and metrics.finished_time > metrics.arrival_time:
        return n / (metrics.finished_time - metrics.arrival_time)
    return 0.0


def format_stats(output: RequestOutput) -> str:
    """The italic line under an answer: tokens, decode speed, time to first token."""
    m = output.metrics
    n = m.num_generation_tokens
    parts = [
        f"{n} token{'s' if n != 1 else ''}",
        f"{decode_rate(m):.1f} tokens/s",
        f"TTFT {m.ttft or 0.0:.2f} s",
    ]
    if output.outputs[0].finish_reason == "length":
        parts.append("max_tokens reached")
    return "*" + " · ".join(parts) + "*"


def chat_stream(
    llm: LLM,
    message: str,
    history: Sequence[Any] | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 256,
) -> Iterator[str]:
    """Stream one chat turn: yields the answer so far, and last the answer with its stats line.

    Arguments are checked here, before anything is queued, so bad input raises at once.
    Closing the iterator early (the Stop button does) aborts the engine request and frees its
    KV blocks.
    """
    messages = history_to_messages(message, history, system_prompt)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    return _stream_answer(llm, messages, params)


def _stream_answer(
    llm: LLM, messages: list[dict[str, str]], params: SamplingParams
) -> Iterator[str]:
    answer, final = "", None
    # a base model (Gemma 3 270M) has no chat format: it continues the conversation's text
    prompt = continuation(messages, system=False) if is_base_model(llm.loaded) else messages
    with engine_lock(llm), closing(llm.stream(prompt, params)) as deltas:
        # closing(): if we are closed at a yield, LLM.stream's own finally aborts the request.
        for out in deltas:
            if out.outputs[0].text:
                answer += out.outputs[0].text
                yield answer
            if out.finished:
                final = out
    if final is None:  # the engine ended the stream without a finished output
        raise RuntimeError("the engine stopped streaming before the request finished")
    yield f"{answer}\n\n{format_stats(final)}" if answer else format_stats(final)


# ---- the Gradio app ---------------------------------------------------------------------------


def message_row() -> tuple[Any, Any, Any, Any]:
    """The message box with its Send / Stop / Clear buttons, shared by the chat labs (call it
    inside a ``gr.Blocks``); the elem_ids are what the browser tests look for."""
    import gradio as gr

    with gr.Row():
        textbox = gr.Textbox(
            show_label=False,
            placeholder="Type a message and press Enter",
            scale=6,
            autofocus=True,
            elem_id="message",
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=80)
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
        clear = gr.Button("Clear", scale=1, min_width=80)
    return textbox, send, stop, clear


def build_chat_app(
    llm: LLM | LazyLLM | Callable[[], LLM],
    title: str = "minillm chat",
    description: str = "",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 256,
) -> gr.Blocks:
    """A Gradio 6 chat app on one model: chatbot, message box, Send/Stop/Clear, settings.

    `llm` is an LLM, or a factory (or LazyLLM) that loads it on the first message. Every chat
    event shares one Gradio concurrency group of size 1, and `chat_stream` also holds the
    engine lock, so users queue instead of colliding (see `engine_lock`). Endpoints: `/chat`
    (message, history, system_prompt, temperature, top_p, max_tokens) streams the answer text.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    shared = _as_lazy(llm)

    def checked_stream(message, history, system, temp, top, max_new) -> Iterator[str]:
        """chat_stream with Gradio's slider floats fixed and input errors shown to the user."""
        try:
            stream = chat_stream(
                shared.get(), message, history, system or "", temp, top, _as_int(max_new)
            )
            with closing(stream):
                yield from stream
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error

    def take_message(message: str, history: list) -> tuple[Any, list, str]:
        # The box stays locked until the answer ends: a message typed meanwhile would be
        # answered from a history that the running answer is still rewriting.
        if not message.strip():
            raise gr.Error("Type a message first.")
        locked_box = gr.Textbox(value="", interactive=False)
        return locked_box, [*history, {"role": "user", "content": message}], message

    def unlock_box() -> Any:
        return gr.Textbox(interactive=True)

    def reply(message, history, system, temp, top, max_new) -> Iterator[list]:
        # history already ends with the user's message (take_message put it there).
        for text in checked_stream(message, history[:-1], system, temp, top, max_new):
            yield [*history, {"role": "assistant", "content": text}]

    def chat(
        message: str,
        history: list[dict[str, Any]] | None = None,
        system_prompt: str = system_prompt,
        temperature: float = temperature,
        top_p: float = top_p,
        max_tokens: int = max_tokens,
    ) -> Iterator[str]:
        """Stream the assistant's answer to `message` after `history` (messages format)."""
        yield from checked_stream(message, history, system_prompt, temperature, top_p, max_tokens)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}" + (f"\n{description}" if description else ""))
        chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot", feedback_options=None)
        textbox, send, stop, clear = message_row()
        with gr.Accordion("Generation settings", open=True):
            system = gr.Textbox(
                label="System prompt", value=system_prompt, lines=2, elem_id="system-prompt"
            )
            with gr.Row():
                temp = gr.Slider(
                    0.0,
                    2.0,
                    value=temperature,
                    step=0.05,
                    label="Temperature",
                    elem_id="temperature",
                )
                top = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p", elem_id="top-p")
                max_new = gr.Slider(
                    1, 1024, value=max_tokens, step=1, label="Max tokens", elem_id="max-tokens"
                )
        pending = gr.State("")

        engine_group = {"concurrency_id": ENGINE_CONCURRENCY_ID, "concurrency_limit": 1}
        ui_only = {"queue": False, "api_visibility": "private"}
        replies = []
        for trigger in (textbox.submit, send.click):
            answer = trigger(
                take_message, [textbox, chatbot], [textbox, chatbot, pending], **ui_only
            ).success(
                reply,
                [pending, chatbot, system, temp, top, max_new],
                [chatbot],
                api_visibility="private",
                **engine_group,
            )
            answer.then(unlock_box, None, textbox, **ui_only)
            replies.append(answer)
        # cancels= makes Gradio close the running generator: chat_stream then aborts the request.
        stop.click(unlock_box, None, textbox, cancels=replies, **ui_only)
        clear.click(
            lambda: ([], "", gr.Textbox(interactive=True)),
            None,
            [chatbot, pending, textbox],
            cancels=replies,
            **ui_only,
        )
        gr.api(chat, api_name=CHAT_API_NAME, **engine_group)
    return demo


def _as_lazy(llm: LLM | LazyLLM | Callable[[], LLM]) -> LazyLLM:
    if isinstance(llm, LazyLLM):
        return llm
    if hasattr(llm, "stream"):  # an LLM already loaded
        return LazyLLM(lambda: llm)
    if callable(llm):
        return LazyLLM(llm)
    raise TypeError(f"llm must be an LLM, a LazyLLM or a factory, got {type(llm).__name__}")


def _as_int(value: Any) -> int:
    """Gradio sliders deliver floats; SamplingParams wants an int for max_tokens."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
