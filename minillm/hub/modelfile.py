"""Modelfile: Ollama's recipe for a model (FROM, SYSTEM, PARAMETER, TEMPLATE, MESSAGE, LICENSE).

A Modelfile does not change weights. It names a base model and says how to *talk* to it: a
system prompt, example turns, default sampling parameters and, optionally, its own prompt
template. `minillm create NAME -f Modelfile` stores it in the registry (see
`minillm.hub.created`); `minillm run NAME` and `minillm serve NAME` then apply it.

Syntax (as Ollama's): one instruction per line, keywords case-insensitive, `#` comments; a value
is the rest of the line, a "double-quoted string" with backslash escapes, or a
\"\"\"triple-quoted string\"\"\" that may span lines. Every error names the line it is on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from minillm.chat import ChatTemplate
from minillm.hub.gotemplate import GoChatTemplate, looks_like_go_template

INSTRUCTIONS = ("FROM", "SYSTEM", "PARAMETER", "TEMPLATE", "MESSAGE", "LICENSE", "ADAPTER")
MESSAGE_ROLES = ("system", "user", "assistant")

# Ollama's parameter names -> (value type, the SamplingParams field it sets, or None).
# num_predict and num_ctx are handled apart (max_tokens and the context length).
PARAMETERS: dict[str, tuple[type, str | None]] = {
    "temperature": (float, "temperature"),
    "top_k": (int, "top_k"),
    "top_p": (float, "top_p"),
    "min_p": (float, "min_p"),
    "repeat_penalty": (float, "repetition_penalty"),
    "presence_penalty": (float, "presence_penalty"),
    "frequency_penalty": (float, "frequency_penalty"),
    "seed": (int, "seed"),
    "stop": (str, "stop"),
    "num_predict": (int, None),
    "num_ctx": (int, None),
}
# Valid in Ollama, accepted here, but with no effect on minillm's engine.
IGNORED_PARAMETERS: dict[str, type] = {
    "num_keep": int,
    "repeat_last_n": int,
    "typical_p": float,
    "tfs_z": float,
    "mirostat": int,
    "mirostat_tau": float,
    "mirostat_eta": float,
    "penalize_newline": bool,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "num_thread": int,
    "num_gqa": int,
    "low_vram": bool,
    "numa": bool,
    "use_mmap": bool,
    "use_mlock": bool,
    "vocab_only": bool,
}


class ModelfileError(ValueError):
    """A Modelfile that cannot be used; the message starts with `<source> line N:`."""


def convert_parameter(name: str, value: Any) -> Any:
    """Check one Ollama parameter (from a Modelfile string or a JSON `options` value).

    Returns the typed value (stop: a list of strings). Raises ValueError naming the parameter.
    """
    kind = PARAMETERS[name][0] if name in PARAMETERS else IGNORED_PARAMETERS.get(name)
    if kind is None:
        known = ", ".join(sorted(PARAMETERS))
        raise ValueError(f"unknown parameter {name!r}; minillm understands: {known}")
    if name == "stop":
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError("stop must be a non-empty string or a list of them")
        return list(values)
    if isinstance(value, str):  # from a Modelfile: parse the text
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            return kind(text) if kind is float else int(text, 10)
        except ValueError:
            raise ValueError(f"{name} must be {_kind_name(kind)}, got {value!r}") from None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be {_kind_name(kind)}, got {type(value).__name__} {value!r}")


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")


def sampling_kwargs(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama parameters -> SamplingParams keyword arguments (ignored ones are dropped).

    num_predict: n > 0 caps the reply; -1 (infinite) and -2 (fill the context) both mean no cap
    besides the context length. num_ctx is not a sampling parameter (see `context_length`).
    """
    out: dict[str, Any] = {}
    for name, value in parameters.items():
        target = PARAMETERS.get(name, (None, None))[1]
        if target is not None:
            out[target] = value
        elif name == "num_predict":
            if value in (-1, -2):
                out["max_tokens"] = None
            elif value > 0:
                out["max_tokens"] = value
            else:
                raise ValueError(f"num_predict must be > 0, -1 or -2, got {value}")
    return out


@dataclass
class Modelfile:
    """A parsed Modelfile. ``parameters`` holds typed values; ``stop`` is a list of strings."""

    from_: str
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ applying it
    def sampling_kwargs(self) -> dict[str, Any]:
        return sampling_kwargs(self.parameters)

    @property
    def context_length(self) -> int | None:
        return self.parameters.get("num_ctx")

    @property
    def ignored_parameters(self) -> list[str]:
        return [p for p in self.parameters if p in IGNORED_PARAMETERS]

    def conversation(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The request's messages behind the Modelfile's SYSTEM and MESSAGE turns.

        A conversation that brings its own system message keeps it (Ollama does the same), so
        the Modelfile's SYSTEM is only a default.
        """
        msgs = [dict(m) for m in messages]
        has_system = any(isinstance(m, Mapping) and m.get("role") == "system" for m in msgs)
        head = [] if has_system or not self.system else [{"role": "system", "content": self.system}]
        return head + [dict(m) for m in self.messages] + msgs

    def prompt_renderer(self, default: ChatTemplate) -> Callable[..., str]:
        """messages -> prompt text: this Modelfile's TEMPLATE if it has one, else `default`."""
        if not self.template:
            return default.render
        return compile_template(self.template, default.bos_token, default.eos_token).render

    # ------------------------------------------------------------------ writing it back
    def to_text(self) -> str:
        """A Modelfile that parses back to this one (what `/api/show` calls "modelfile")."""
        lines = [f"FROM {self.from_}"]
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        for name, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {_quote(v)}")
        for m in self.messages:
            lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
        for text in self.license:
            lines.append(f'LICENSE """{text}"""')
        return "\n".join(lines) + "\n"

    def parameters_text(self) -> str:
        """Ollama's `show --parameters` layout: one `name value` per line."""
        rows = []
        for name, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                rows.append(f"{name:<30} {_quote(v)}")
        return "\n".join(rows)


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return str(value)


def compile_template(source: str, bos_token: str = "", eos_token: str = "") -> Any:
    """A TEMPLATE as a renderer: Ollama's Go syntax (a subset) or a Jinja2 chat template."""
    if looks_like_go_template(source):
        return GoChatTemplate(source)
    return ChatTemplate(source, bos_token, eos_token)


# ---------------------------------------------------------------------------- parsing
def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Parse Modelfile text. Raises ModelfileError whose message names the line."""
    if not isinstance(text, str):
        raise TypeError(f"a Modelfile must be text, got {type(text).__name__}")
    lines = text.splitlines()
    found: dict[str, Any] = {"parameters": {}, "messages": [], "license": []}
    from_line = None
    i = 0
    while i < len(lines):
        lineno = i + 1
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue

        def fail(msg: str, at: int = lineno) -> ModelfileError:
            return ModelfileError(f"{source} line {at}: {msg}")

        keyword, rest = _split_word(stripped)
        kw = keyword.upper()
        if kw not in INSTRUCTIONS:
            raise fail(
                f"unknown instruction {keyword!r}; expected one of {', '.join(INSTRUCTIONS)}"
            )
        if kw == "ADAPTER":
            raise fail("ADAPTER (LoRA adapters) is not supported by minillm")
        if kw == "PARAMETER":
            name, value_text = _split_word(rest)
            if not name:
                raise fail("PARAMETER needs a name and a value, e.g. `PARAMETER temperature 0.7`")
            value, i = _read_value(value_text, lines, i, fail)
            try:
                typed = convert_parameter(name.lower(), value)
            except ValueError as e:
                raise fail(str(e)) from None
            params = found["parameters"]
            if name.lower() == "stop":
                params.setdefault("stop", []).extend(typed)
            else:
                params[name.lower()] = typed
            continue
        if kw == "MESSAGE":
            role, value_text = _split_word(rest)
            if role.lower() not in MESSAGE_ROLES:
                raise fail(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
            value, i = _read_value(value_text, lines, i, fail)
            found["messages"].append({"role": role.lower(), "content": value.strip()})
            continue
        value, i = _read_value(rest, lines, i, fail)
        if kw == "FROM":
            if from_line is not None:
                raise fail(f"a second FROM (the first is on line {from_line}); use one base model")
            if not value.strip():
                raise fail("FROM needs a model name or path")
            found["from_"], from_line = value.strip(), lineno
        elif kw == "SYSTEM":
            found["system"] = value.strip()
        elif kw == "LICENSE":
            found["license"].append(value.strip())
        elif kw == "TEMPLATE":
            try:
                compile_template(value)
            except ValueError as e:
                raise fail(f"TEMPLATE is not valid: {e}") from None
            found["template"] = value
    if from_line is None:
        raise ModelfileError(f"{source}: no FROM line; a Modelfile must name its base model")
    return Modelfile(**found)


def _split_word(text: str) -> tuple[str, str]:
    m = re.match(r"(\S+)\s*(.*)", text, re.S)
    return (m.group(1), m.group(2)) if m else ("", "")


def _read_value(
    first: str, lines: list[str], i: int, fail: Callable[..., ModelfileError]
) -> tuple[str, int]:
    """The value starting in `first` (the rest of line i); returns it and the next line index."""
    if first.startswith('"""'):
        body = first[3:]
        start = i
        parts = []
        while True:
            end = body.find('"""')
            if end >= 0:
                parts.append(body[:end])
                if body[end + 3 :].strip():
                    raise fail('unexpected text after the closing """', i + 1)
                return "\n".join(parts), i + 1
            parts.append(body)
            i += 1
            if i >= len(lines):
                raise fail('this """ string is never closed', start + 1)
            body = lines[i]
    if first.startswith('"'):
        out, j = [], 1
        escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
        while j < len(first):
            ch = first[j]
            if ch == "\\" and j + 1 < len(first):
                out.append(escapes.get(first[j + 1], "\\" + first[j + 1]))
                j += 2
                continue
            if ch == '"':
                if first[j + 1 :].strip():
                    raise fail("unexpected text after the closing quote")
                return "".join(out), i + 1
            out.append(ch)
            j += 1
        raise fail('this "string" is never closed (use """ for text over several lines)')
    if not first.strip():
        raise fail("this instruction needs a value")
    return first.strip(), i + 1
