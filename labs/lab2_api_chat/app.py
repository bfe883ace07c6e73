"""Lab 2: a streaming chat with ANY OpenAI-compatible server, through the `openai` SDK.

The same app talks to `minillm serve` (http://127.0.0.1:8000/v1), Ollama
(http://127.0.0.1:11434/v1), vLLM or llama.cpp's server: only the base URL, the key and the
model name change. That is the point of an OpenAI-compatible API.

    python -m labs.lab2_api_chat.app --base-url http://127.0.0.1:8000/v1 --model smollm2
    python -m labs.lab2_api_chat.app --port 7862

`build_demo()` returns the app without launching it, so tests and the notebook can drive it
(`gradio_client`, endpoint `/chat`). The answer ends with a stats line measured on the client
side: tokens (the server's `usage`), decode speed and time to first token.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import closing
from typing import TYPE_CHECKING, Any

from minillm.ui.chat import (
    CHAT_API_NAME,
    DEFAULT_SYSTEM_PROMPT,
    history_to_messages,
    message_row,
)

# Before Gradio is imported: no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if TYPE_CHECKING:
    import gradio as gr
    import openai

DEFAULT_BASE_URL = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
DEFAULT_PORT = 7862
TITLE = "minillm · Lab 2: chat with any OpenAI-compatible server"


def stats_line(tokens: int, ttft: float, total: float, finish_reason: str | None) -> str:
    """*N tokens · R tokens/s · TTFT T s*, the format Lab 1 uses (so history can strip it).

    The rate counts the tokens after the first over the time after the first, the decode speed;
    a one-token answer has no decode phase, so its rate covers the whole request."""
    decode = total - ttft
    rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else tokens / total if total else 0
    parts = [
        f"{tokens} token{'s' if tokens != 1 else ''}",
        f"{rate:.1f} tokens/s",
        f"TTFT {ttft:.2f} s",
    ]
    if finish_reason == "length":
        parts.append("max_tokens reached")
    return "*" + " · ".join(parts) + "*"


def stream_chat(
    client: openai.OpenAI,
    model: str,
    message: str,
    history: list | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 256,
) -> Iterator[str]:
    """Yield the growing answer, then the answer with its stats line.

    Closing the generator early (the Stop button) closes the HTTP stream; a server that
    notices (minillm, vLLM) aborts the request and frees its KV cache.
    """
    messages = history_to_messages(message, history, system_prompt)
    if not model:
        raise ValueError("choose a model (the server's /v1/models lists them)")
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=temperature,
        top_p=top_p,
        max_tokens=int(max_tokens),
        stream=True,
        stream_options={"include_usage": True},
    )
    answer, ttft, tokens, reason = "", None, 0, None
    with closing(stream):
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                reason = choice.finish_reason or reason
                if choice.delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    answer += choice.delta.content
                    yield answer
    total = time.perf_counter() - start
    line = stats_line(tokens, ttft if ttft is not None else total, total, reason)
    yield f"{answer}\n\n{line}" if answer else line


def list_models(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list().data]


def build_demo(
    base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, model: str | None = None
) -> gr.Blocks:
    """The chat app. `base_url` ends in /v1; `api_key` defaults to $OPENAI_API_KEY (or a
    placeholder, since local servers usually accept any key); `model` to the server's first."""
    import gradio as gr
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"

    def client_for(url: str, secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url.strip(), api_key=secret.strip() or key, max_retries=0)

    def chosen_model(client: openai.OpenAI, name: str) -> str:
        if name:
            return name
        names = list_models(client)
        if not names:
            raise gr.Error("the server lists no models")
        return names[0]

    def guarded(url: str, secret: str, name: str, *args: Any) -> Iterator[str]:
        """stream_chat with client errors shown in the UI (and to API callers) as gr.Error."""
        try:
            client = client_for(url, secret)
            with closing(stream_chat(client, chosen_model(client, name), *args)) as answers:
                yield from answers
        except openai.APIStatusError as e:
            raise gr.Error(f"the server said {e.status_code}: {_message(e)}") from e
        except openai.APIConnectionError as e:
            raise gr.Error(f"cannot reach {url}: {e}") from e
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e)) from e

    def chat(
        message: str,
        history: list[dict[str, Any]] | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 256,
        model: str = model or "",
    ) -> Iterator[str]:
        """Stream the answer to `message` after `history` (messages format) from the server."""
        yield from guarded(
            base_url, key, model, message, history, system_prompt, temperature, top_p, max_tokens
        )

    def refresh(url: str, secret: str) -> Any:
        try:
            names = list_models(client_for(url, secret))
        except openai.OpenAIError as e:
            raise gr.Error(f"cannot list models at {url}: {e}") from e
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    def take_message(message: str, history: list) -> tuple[str, list, str]:
        if not message.strip():
            raise gr.Error("Type a message first.")
        return "", [*history, {"role": "user", "content": message}], message

    def reply(message, history, url, secret, name, system, temp, top, max_new) -> Iterator[list]:
        for text in guarded(
            url, secret, name, message, history[:-1], system, temp, top, int(max_new)
        ):
            yield [*history, {"role": "assistant", "content": text}]

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\nPoint it at any server that speaks the OpenAI API.")
        with gr.Row():
            url_box = gr.Textbox(label="Base URL", value=base_url, scale=3, elem_id="base-url")
            key_box = gr.Textbox(
                label="API key",
                value="",
                type="password",
                scale=2,
                placeholder="(the app's default key)",
                elem_id="api-key",
            )
            model_box = gr.Dropdown(
                label="Model",
                choices=[model] if model else [],
                value=model,
                allow_custom_value=True,
                scale=2,
                elem_id="model",
            )
            refresh_btn = gr.Button("List models", scale=1)
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot")
        textbox, send, stop, clear = message_row()
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(label="System prompt", value=DEFAULT_SYSTEM_PROMPT, lines=2)
            with gr.Row():
                temp = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                max_new = gr.Slider(1, 2048, value=256, step=1, label="Max tokens")
        pending = gr.State("")

        refresh_btn.click(refresh, [url_box, key_box], [model_box], api_visibility="private")
        replies = [
            trigger(
                take_message,
                [textbox, chatbot],
                [textbox, chatbot, pending],
                queue=False,
                api_visibility="private",
            ).success(
                reply,
                [pending, chatbot, url_box, key_box, model_box, system, temp, top, max_new],
                [chatbot],
                api_visibility="private",
            )
            for trigger in (textbox.submit, send.click)
        ]
        stop.click(None, cancels=replies)
        clear.click(
            lambda: ([], ""),
            None,
            [chatbot, pending],
            queue=False,
            api_visibility="private",
            cancels=replies,
        )
        gr.api(chat, api_name=CHAT_API_NAME)
    return demo


def _message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Lab 2: chat with an OpenAI-compatible server")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the server's /v1 URL")
    parser.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--host", default="127.0.0.1", help="interface for the web page")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for the web page")
    args = parser.parse_args(argv)
    demo = build_demo(args.base_url, args.api_key, args.model)
    _, url, _ = demo.launch(
        server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True
    )
    print(
        f"Lab 2 chat is running at {url}, talking to {args.base_url} (Ctrl+C to stop)", flush=True
    )
    try:
        demo.block_thread()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
