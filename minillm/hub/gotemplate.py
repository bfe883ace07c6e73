"""Ollama's TEMPLATE language (Go's text/template), the subset chat templates use, via Jinja2.

Ollama writes prompt templates in Go syntax: `{{ .System }}`, `{{ if .Prompt }}...{{ end }}`,
`{{ range .Messages }}{{ .Role }}: {{ .Content }}{{ end }}`, with `{{-`/`-}}` trimming spaces.
minillm's engine renders Jinja2 (the Hugging Face format), so a Go template is translated once
into Jinja2 and rendered by the same sandbox as every other chat template.

Supported: fields (`.X`, `$.X`, `$var.X`), `if` / `else if` / `else` / `end`, `range` (also
`range $i, $m := ...`), the functions `eq ne lt le gt ge and or not len`, string and number
literals, parentheses and `{{/* comments */}}`. Anything else is a ValueError saying so.

Two ways a chat becomes a prompt, as in Ollama:
- a template that uses `.Messages` is rendered once with all of them;
- an older template (`.System`, `.Prompt`, `.Response`) is rendered once per user turn and the
  pieces are joined; the last turn stops where `{{ .Response }}` would put the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minillm.chat import render_bounded, template_failure, validate_messages

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|[^\s()]+)')
_GO_HINT = re.compile(r"\{\{-?\s*(\.|\$|if\s|range\s|end\b|else\b|/\*)")
_FUNCS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_RESPONSE_MARK = "\x00minillm-response\x00"


def looks_like_go_template(source: str) -> bool:
    """Go syntax (`{{ .Prompt }}`) and no Jinja2 statements (`{% ... %}`)."""
    return "{%" not in source and bool(_GO_HINT.search(source))


def _literal(text: str) -> str:
    """Plain text of the Go template, made safe inside Jinja2."""
    if any(s in text for s in ("{{", "{%", "{#", "}}", "%}", "#}")):
        return "{% raw %}" + text + "{% endraw %}"
    return text


class _Translator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.blocks: list[str] = []  # "if" / "for"
        self.dots: list[str] = ["go_root"]  # what `.` means in each enclosing range
        self.vars: dict[str, str] = {}
        self.counter = 0

    def run(self) -> str:
        out, pos = [], 0
        for m in _ACTION.finditer(self.source):
            out.append(_literal(self.source[pos : m.start()]))
            ltrim, body, rtrim = m.group(1) == "-", m.group(2).strip(), m.group(3) == "-"
            out.append(self.action(body, "{%-" if ltrim else "{%", "-%}" if rtrim else "%}"))
            pos = m.end()
        out.append(_literal(self.source[pos:]))
        if self.blocks:
            raise ValueError(f"the template has an unclosed {{{{ {self.blocks[-1]} }}}} block")
        return "".join(out)

    def action(self, body: str, open_: str, close: str) -> str:
        if body.startswith("/*"):
            return f"{open_} if false {close}{open_} endif {close}"  # trims like Go, emits nothing
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word) :].strip()
        if word == "if":
            self.blocks.append("if")
            return f"{open_} if {self.expr(rest)} {close}"
        if word == "else":
            if rest.startswith("if "):
                return f"{open_} elif {self.expr(rest[3:])} {close}"
            if rest:
                raise ValueError(f"unsupported template action {{{{ {body} }}}}")
            return f"{open_} else {close}"
        if word == "end":
            if not self.blocks:
                raise ValueError("the template has an {{ end }} without a block to close")
            kind = self.blocks.pop()
            if kind == "for":
                self.dots.pop()
            return f"{open_} end{kind} {close}"
        if word == "range":
            return self.range(rest, open_, close)
        if word in ("with", "define", "template", "block", "break", "continue"):
            raise ValueError(f"{{{{ {word} }}}} is not supported by minillm's template translator")
        if ":=" in body or "=" in body.split('"')[0]:
            raise ValueError(f"template variables ({body}) are only supported in range")
        return (
            ("{{-" if open_.endswith("-") else "{{")
            + f" {self.expr(body)} "
            + ("-}}" if close.startswith("-") else "}}")
        )

    def range(self, rest: str, open_: str, close: str) -> str:
        m = re.fullmatch(r"(?:\$(\w+)\s*,\s*)?(?:\$(\w+)\s*:=\s*)?(.+)", rest, re.S)
        if not m or not m.group(3).strip():
            raise ValueError(f"cannot read {{{{ range {rest} }}}}")
        first, second, target = m.group(1), m.group(2), m.group(3)
        if first and not second:  # `range $m := x` parses as first=None; `$i, $m :=` needs both
            raise ValueError(f"cannot read {{{{ range {rest} }}}}")
        seq = self.expr(target)
        self.counter += 1
        item = f"go_it{self.counter}"
        if second:
            self.vars[second] = item
        if first:
            self.vars[first] = "loop.index0"
        self.blocks.append("for")
        self.dots.append(item)
        return f"{open_} for {item} in {seq} {close}"

    # ---------------------------------------------------------------- expressions
    def expr(self, text: str) -> str:
        tokens = [t for t in _TOKEN.findall(text) if t]
        if not tokens:
            raise ValueError("an empty template action")
        value = self.pipeline(tokens)
        if tokens:
            raise ValueError(f"cannot read {text!r} in the template")
        return value

    def pipeline(self, tokens: list[str]) -> str:
        head = tokens[0]
        if head in _FUNCS or head in ("and", "or", "not", "len"):
            tokens.pop(0)
            args = []
            while tokens and tokens[0] != ")":
                args.append(self.term(tokens))
            if head in _FUNCS:
                if len(args) != 2:
                    raise ValueError(f"{head} takes two arguments in minillm's translator")
                return f"({args[0]} {_FUNCS[head]} {args[1]})"
            if head in ("not", "len"):
                if len(args) != 1:
                    raise ValueError(f"{head} takes one argument")
                return f"(not {args[0]})" if head == "not" else f"({args[0]} | length)"
            if len(args) < 2:
                raise ValueError(f"{head} takes at least two arguments")
            return "(" + f" {head} ".join(args) + ")"
        return self.term(tokens)

    def term(self, tokens: list[str]) -> str:
        tok = tokens.pop(0)
        if tok == "(":
            value = self.pipeline(tokens)
            if not tokens or tokens.pop(0) != ")":
                raise ValueError("unbalanced parentheses in the template")
            return value
        if tok.startswith('"'):
            return tok
        if tok.startswith("`"):
            return repr(tok[1:-1])
        if re.fullmatch(r"-?\d+(\.\d+)?", tok) or tok in ("true", "false"):
            return tok
        if tok.startswith("$"):
            name, _, path = tok[1:].partition(".")
            if name == "":
                base = "go_root"
            elif name in self.vars:
                base = self.vars[name]
            else:
                raise ValueError(f"unknown template variable ${name}")
            return self.field(base, path)
        if tok.startswith("."):
            return self.field(self.dots[-1], tok[1:])
        raise ValueError(f"unsupported template function or word {tok!r}")

    @staticmethod
    def field(base: str, path: str) -> str:
        return base + "".join(f"[{p!r}]" for p in path.split(".") if p)


def go_to_jinja(source: str) -> str:
    """Translate a Go chat template (the subset above) into Jinja2 source."""
    return _Translator(source).run()


class GoChatTemplate:
    """A TEMPLATE in Ollama's Go syntax, rendered like Ollama renders it (see module docs)."""

    def __init__(self, source: str) -> None:
        self.source = source
        # Go keeps every newline around actions (only {{- -}} trim): no Jinja trimming here
        env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, autoescape=False)
        try:
            self._jinja = env.from_string(go_to_jinja(source))
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the translated template does not compile: {e.message}") from e
        self.uses_messages = bool(re.search(r"\.Messages\b", source))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        max_chars: int | None = None,
        **_: Any,
    ) -> str:
        """The prompt text; `max_chars` caps it (see `minillm.chat.render_bounded`)."""
        clean = validate_messages(messages)
        try:
            return self._render(clean, max_chars)
        except MemoryError:
            raise
        except Exception as e:
            raise template_failure(e) from e

    def _render(self, clean: list[dict[str, Any]], max_chars: int | None) -> str:
        system = "\n".join(m["content"] or "" for m in clean if m["role"] == "system")
        turns = [m for m in clean if m["role"] != "system"]
        if self.uses_messages:
            msgs = [{"Role": m["role"], "Content": m["content"] or ""} for m in clean]
            last_user = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
            return self._run(max_chars, System=system, Messages=msgs, Prompt=last_user, Response="")
        pairs: list[tuple[str, str | None]] = []  # (prompt, answer); None: to be answered
        pending: str | None = None
        for m in turns:
            if m["role"] == "assistant":
                pairs.append((pending or "", m["content"] or ""))
                pending = None
            else:  # user (or tool) text opens a turn; two in a row: the first had no answer
                if pending is not None:
                    pairs.append((pending, ""))
                pending = m["content"] or ""
        if pending is not None:
            pairs.append((pending, None))
        out, size = [], 0
        for k, (prompt, answer) in enumerate(pairs):
            text = self._run(
                None if max_chars is None else max_chars - size,
                System=system if k == 0 else "",
                Prompt=prompt,
                First=k == 0,
                Response=_RESPONSE_MARK if answer is None else answer,
            )
            # the turn the model answers stops where the answer goes
            out.append(text.split(_RESPONSE_MARK)[0] if answer is None else text)
            size += len(out[-1])
        return "".join(out)

    def _run(self, max_chars: int | None, **root: Any) -> str:
        return render_bounded(self._jinja, max_chars, go_root=root)
