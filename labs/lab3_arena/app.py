"""Lab 3: the arena. One prompt streamed to two models at once through `minillm gateway`,
side by side, with live TTFT and tokens/s under each answer; a blind mode with votes and a
leaderboard (Elo and Bradley–Terry) kept in a JSON file.

Run it from the repository root (what `make arena` does):

    python -m labs.lab3_arena.app            # starts the bundled SmolLM2 as Q4_1 and Q8_0
    python -m labs.lab3_arena.app --upstream http://127.0.0.1:11434/v1   # add Ollama's models
    python -m labs.lab3_arena.app --gateway http://127.0.0.1:9000        # an existing gateway

`build_demo()` returns the app without launching it, so tests and the notebook can drive it
(`gradio_client`: `/duel` streams both answers, `/vote` records a blind vote, `/leaderboard`).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labs.lab3_arena.arena import Arena
from labs.lab3_arena.leaderboard import PRIOR_TIES, K, Leaderboard
from labs.lab3_arena.stack import CACHE, ArenaStack

# Before Gradio is imported: no usage reports leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_GATEWAY = os.environ.get("ARENA_GATEWAY_URL", "http://127.0.0.1:9000")
DEFAULT_VOTES = CACHE / "votes.json"
DEFAULT_PORT = 7863
TITLE = "minillm · Lab 3: the arena"
VOTES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both are bad": "both_bad"}
COLUMNS = ["model", "Elo", "Bradley–Terry", "games", "wins", "losses", "ties"]


def leaderboard_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["model"], round(r["elo"], 1), round(r["bradley_terry"], 1), r["games"], r["wins"],
             r["losses"], r["ties"]] for r in rows]  # fmt: skip


def build_demo(
    base_url: str = DEFAULT_GATEWAY,
    api_key: str | None = None,
    votes_path: str | Path = DEFAULT_VOTES,
    seed: int | None = None,
) -> gr.Blocks:
    """The arena on the gateway at `base_url` (without /v1); votes saved to `votes_path`.
    `seed` fixes the blind left/right draws (tests)."""
    import gradio as gr
    import openai

    client = openai.OpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
        max_retries=0,
    )
    arena = Arena(client, Leaderboard(votes_path), random.Random(seed))

    def guarded(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except openai.APIStatusError as e:
            raise gr.Error(f"the gateway said {e.status_code}: {e.message}") from e
        except openai.APIConnectionError as e:
            raise gr.Error(f"cannot reach the gateway at {base_url}: {e}") from e
        except ValueError as e:
            raise gr.Error(str(e)) from e

    # ---- the API (gradio_client) --------------------------------------------------------
    def duel(
        prompt: str,
        model_1: str = "",
        model_2: str = "",
        blind: bool = True,
        system_prompt: str = "",
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 128,
    ) -> Iterator[dict]:
        """Stream `prompt` to two models; each update holds the round id and both sides."""
        updates = guarded(
            arena.duel, prompt, model_1, model_2, blind, system_prompt, temperature, top_p,
            int(max_tokens),
        )  # fmt: skip
        while True:
            try:
                update = guarded(next, updates, None)
            except gr.Error:
                updates.close()
                raise
            if update is None:
                return
            yield update

    def vote(round_id: str, outcome: str) -> dict:
        """Vote on a finished blind round (outcome: A, B, tie, both_bad); names revealed."""
        return guarded(arena.vote, round_id, outcome)

    def leaderboard() -> list[dict]:
        """The current ratings, best first."""
        from dataclasses import asdict

        return [asdict(r) for r in arena.leaderboard.rows()]

    # ---- the page -------------------------------------------------------------------------
    def refresh() -> tuple[Any, Any]:
        names = guarded(arena.models)
        return (gr.Dropdown(choices=names, value=names[0] if names else None),
                gr.Dropdown(choices=names, value=names[1] if len(names) > 1 else None))  # fmt: skip

    def start(prompt: str) -> tuple[Any, ...]:
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        user = [{"role": "user", "content": prompt}]
        off = gr.Button(interactive=False)
        return prompt, user, user, "", "", "", "", off, off, off, off

    def run(prompt, m1, m2, blind, system, temp, top, max_new) -> Iterator[tuple[Any, ...]]:
        user = {"role": "user", "content": prompt}
        for u in duel(prompt, m1 or "", m2 or "", blind, system, temp, top, max_new):
            a, b = u["a"], u["b"]
            can_vote = u["done"] and u["blind"] and not (a["error"] or b["error"])
            note = ("Which answer is better? Names are shown after your vote." if can_vote
                    else "" if u["blind"] else "Names shown: only blind rounds are voted on.")  # fmt: skip
            btn = gr.Button(interactive=can_vote)
            yield (
                gr.Chatbot(value=[user, {"role": "assistant", "content": a["text"]}],
                           label=f"Model {a['model']}" if u["blind"] else a["model"]),
                gr.Chatbot(value=[user, {"role": "assistant", "content": b["text"]}],
                           label=f"Model {b['model']}" if u["blind"] else b["model"]),
                a["stats"], b["stats"], u["round"], note, btn, btn, btn, btn,
            )  # fmt: skip

    def cast(outcome: str) -> Any:
        def on_click(round_id: str) -> tuple[Any, ...]:
            result = vote(round_id, outcome)
            off = gr.Button(interactive=False)
            said = {"A": "A is better", "B": "B is better", "tie": "a tie",
                    "both_bad": "both are bad"}[outcome]  # fmt: skip
            reveal = f"You voted **{said}**. A was **{result['a']}**, B was **{result['b']}**."
            return (reveal, leaderboard_rows(result["leaderboard"]),
                    gr.Chatbot(label=f"A: {result['a']}"), gr.Chatbot(label=f"B: {result['b']}"),
                    off, off, off, off)  # fmt: skip

        return on_click

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"## {TITLE}\nOne prompt, two models, streamed at once through the gateway at "
            f"`{base_url}`. In blind mode the sides are shuffled and the names hidden until you "
            f"vote. Leaderboard: Elo (K = {K:g}, in vote order) and Bradley–Terry (maximum "
            f"likelihood over all votes, {PRIOR_TIES:g} virtual tie per pair)."
        )
        with gr.Row():
            m1 = gr.Dropdown(label="Model 1", allow_custom_value=True, elem_id="model-1")
            m2 = gr.Dropdown(label="Model 2", allow_custom_value=True, elem_id="model-2")
            blind = gr.Checkbox(label="Blind (hide names, shuffle sides)", value=True,
                                elem_id="blind")  # fmt: skip
            refresh_btn = gr.Button("List models", scale=0)
        with gr.Row():
            with gr.Column():
                chat_a = gr.Chatbot(label="Model A", height=360, elem_id="chat-a")
                stats_a = gr.Markdown(elem_id="stats-a")
            with gr.Column():
                chat_b = gr.Chatbot(label="Model B", height=360, elem_id="chat-b")
                stats_b = gr.Markdown(elem_id="stats-b")
        with gr.Row():
            prompt = gr.Textbox(show_label=False, placeholder="Ask both models...", scale=5,
                                elem_id="prompt")  # fmt: skip
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
        note = gr.Markdown(elem_id="note")
        with gr.Row():
            buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{code}")
                       for label, code in VOTES.items()]  # fmt: skip
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(label="System prompt", value="", lines=2)
            with gr.Row():
                temp = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                 elem_id="temperature")  # fmt: skip
                top = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                max_new = gr.Slider(1, 1024, value=128, step=1, label="Max tokens",
                                    elem_id="max-tokens")  # fmt: skip
        board = gr.Dataframe(headers=COLUMNS, label="Leaderboard", interactive=False,
                             elem_id="leaderboard")  # fmt: skip
        round_id, pending = gr.State(""), gr.State("")

        private = {"api_visibility": "private"}
        demo.load(refresh, None, [m1, m2], **private)
        demo.load(lambda: leaderboard_rows(leaderboard()), None, [board], **private)
        refresh_btn.click(refresh, None, [m1, m2], **private)
        runs = [
            trigger(start, [prompt],
                    [pending, chat_a, chat_b, stats_a, stats_b, round_id, note, *buttons],
                    queue=False, **private)
            .success(run, [pending, m1, m2, blind, system, temp, top, max_new],
                     [chat_a, chat_b, stats_a, stats_b, round_id, note, *buttons], **private)
            for trigger in (prompt.submit, send.click)
        ]  # fmt: skip
        stop.click(None, cancels=runs)
        for button, code in zip(buttons, VOTES.values(), strict=True):
            button.click(cast(code), [round_id],
                         [note, board, chat_a, chat_b, *buttons], **private)  # fmt: skip
        gr.api(duel, api_name="duel")
        gr.api(vote, api_name="vote")
        gr.api(leaderboard, api_name="leaderboard")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Lab 3: two models side by side, blind votes")
    parser.add_argument("--gateway", default=None,
                        help="use this running gateway (http://host:port) instead of starting "
                        "the bundled model's upstreams and a gateway")  # fmt: skip
    parser.add_argument("--upstream", action="append", default=[], metavar="URL",
                        help="another OpenAI-compatible server to put behind the gateway, "
                        "e.g. llama.cpp's http://127.0.0.1:8080 (repeat for more)")  # fmt: skip
    parser.add_argument(
        "--to", default="q8_0", help="the second quantization of the bundled model (default q8_0)"
    )
    parser.add_argument("--backend", default="auto", help="backend of the upstreams")
    parser.add_argument("--votes", default=str(DEFAULT_VOTES), help="the votes JSON file")
    parser.add_argument("--host", default="127.0.0.1", help="interface for the web page")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port for the web page")
    args = parser.parse_args(argv)
    stack = None
    if args.gateway is None:
        print(f"starting smollm2 (q4_1) and smollm2 ({args.to}) behind a gateway ...", flush=True)
        stack = ArenaStack.start((args.to,), args.backend, args.upstream)
        for u in stack.upstreams:
            print(f"  {u.name}: {u.url} (log {u.log})", flush=True)
    url = args.gateway or stack.gateway_url
    try:
        demo = build_demo(url, votes_path=args.votes)
        _, page, _ = demo.launch(
            server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True
        )
        print(f"Lab 3 arena at {page}, gateway {url}, votes in {args.votes} (Ctrl+C to stop)",
              flush=True)  # fmt: skip
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            print("stopping the arena, the gateway and the upstreams", flush=True)
        finally:
            demo.close()
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
