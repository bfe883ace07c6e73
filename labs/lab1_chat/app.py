"""Lab 1: a streaming chat with a bundled model.

Run it from the repository root (what `make chat` does):

    python -m labs.lab1_chat.app                       # http://127.0.0.1:7860, SmolLM2
    python -m labs.lab1_chat.app --port 7861
    python -m labs.lab1_chat.app --model gemma3-270m   # Gemma 3 270M: knows Chinese

Gemma 3 270M is a *base* model: it has no chat format and continues the text it is given
("北京是中国的" -> "首都，……"), so write the beginning of what you want, not a question.

`build_demo()` returns the app without launching it, so tests and the notebook can drive it.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from minillm.ui.chat import LazyLLM, build_chat_app

# Before Gradio is imported (build_chat_app imports it): no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if TYPE_CHECKING:
    import gradio as gr

    from minillm.llm import LLM

MODEL = "smollm2"
DEFAULT_PORT = 7860
TITLE = "minillm · Lab 1: streaming chat"
_STATS = (
    "Answers stream token by token; the line under each answer shows tokens, decode speed and "
    "time to first token."
)
MODELS = {  # --model choices: what each one is
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF) on the minillm engine. " + _STATS,
    "gemma3-270m": (
        "Gemma 3 270M (Q4_K_M GGUF) on the minillm engine: a base model, it continues your "
        "text (try 北京是中国的) instead of answering; it knows Chinese. " + _STATS
    ),
}
DESCRIPTION = MODELS[MODEL]
_chosen = MODEL  # main(--model) sets it before the model loads


def _load_bundled() -> LLM:
    from minillm import LLM

    return LLM(_chosen)


# One model per process, loaded on the first message (or by main() before it serves).
BUNDLED = LazyLLM(_load_bundled)


def build_demo(llm: LLM | None = None, model: str = MODEL) -> gr.Blocks:
    """The chat app on `llm`, or on the bundled `model` (loaded once, on first use)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    return build_chat_app(
        BUNDLED if llm is None else llm,
        title=TITLE,
        description=MODELS[model],
        temperature=0.3,
        top_p=0.9,
        max_tokens=256,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Lab 1: a streaming chat on the bundled model")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
        help="port (default: $GRADIO_SERVER_PORT or 7860)",
    )
    parser.add_argument(
        "--model", choices=list(MODELS), default=MODEL, help=f"bundled model (default {MODEL})"
    )
    args = parser.parse_args(argv)
    global _chosen
    _chosen = args.model
    print(f"Loading {args.model} ...", flush=True)
    BUNDLED.get()
    demo = build_demo(model=args.model)
    _, url, _ = demo.launch(
        server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True
    )
    print(f"Lab 1 chat is running at {url} (Ctrl+C to stop)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
