"""Chat templates: a list of messages -> the exact prompt text an instruct model was trained on.

Each model ships its own Jinja2 template (in the GGUF metadata or tokenizer_config.json). We
render it the way Hugging Face transformers does -- sandboxed, `trim_blocks`, `lstrip_blocks`,
with `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text -- because a
prompt that differs by one newline from the training format measurably hurts the answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from minillm.tokenizer import Tokenizer

ROLES = frozenset({"system", "user", "assistant", "tool"})
# Chat data is shallow (a message, its content parts, tool calls); deeper is an error, not a
# RecursionError from the copy below.
MAX_DATA_DEPTH = 32

# Used only when a model has no template of its own (a base model, or a file without one):
# ChatML, the most common format. Such a model was never trained on it, so answers may be poor.
FALLBACK_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return a plain copy the template can safely read.

    Content may be a string or a list of {"type": "text", "text": ...} parts (OpenAI style),
    which is flattened to one string joined by newlines. An assistant message that only
    carries tool_calls may have content None.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one message")
    clean: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"messages[{i}] has no 'role'")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(
                f"messages[{i}] has unknown role {role!r}; expected one of {sorted(ROLES)}"
            )
        if "content" not in message:
            raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        out = _plain(dict(message), f"messages[{i}]")
        out["content"] = _flatten_content(message["content"], i, role, message)
        clean.append(out)
    return clean


def _flatten_content(content: Any, i: int, role: str, message: Mapping[str, Any]) -> str | None:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant" and message.get("tool_calls"):
        return None
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TypeError(
                    f"messages[{i}].content[{j}] is {kind!r}; only text parts "
                    '({"type": "text", "text": ...}) are supported'
                )
            if not isinstance(part.get("text"), str):
                raise TypeError(f"messages[{i}].content[{j}].text must be a str")
            texts.append(part["text"])
        return "\n".join(texts)
    raise TypeError(
        f"messages[{i}] ({role}) content must be a str or a list of text parts, "
        f"got {type(content).__name__}"
    )


def _plain(value: Any, where: str = "chat template data", depth: int = 0) -> Any:
    """Rebuild user data from JSON types only, so the sandbox never sees custom objects."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth >= MAX_DATA_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_DATA_DEPTH} levels deep")
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where, depth + 1) for v in value]
    raise TypeError(f"chat template data must be JSON-like, got {type(value).__name__}")


class TemplateOutputTooLong(ValueError):
    """A template's output passed the caller's limit (most likely a runaway loop)."""


def render_bounded(template: jinja2.Template, max_chars: int | None, **variables: Any) -> str:
    """Render `template`, giving up as soon as its output passes `max_chars` (None: no limit).

    Pieces are counted as the template yields them, so a runaway stops at the limit instead of
    filling memory first.
    """
    if max_chars is None:
        return template.render(**variables)
    pieces, size = [], 0
    for piece in template.generate(**variables):
        size += len(piece)
        if size > max_chars:
            raise TemplateOutputTooLong(
                f"the template's output is longer than {max_chars} characters"
            )
        pieces.append(piece)
    return "".join(pieces)


def template_failure(error: Exception) -> ValueError:
    """A template's own error (a raise_exception, 1/0, a bad index) as a ValueError that says
    so: a template is code, and its failure on a conversation is the caller's problem."""
    if isinstance(error, TemplateOutputTooLong):
        return error
    if isinstance(error, jinja2.TemplateError):
        return ValueError(f"chat template rejected the conversation: {error}")
    return ValueError(f"chat template failed on this conversation: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------- the Jinja environment
class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML; prompts need the raw characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


class ChatTemplate:
    """A compiled chat template. An empty `source` means "the model has none": then the
    ChatML fallback (FALLBACK_CHATML_TEMPLATE) is used and `is_fallback` is True."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        if source is not None and not isinstance(source, str):
            raise TypeError(f"chat template source must be a str, got {type(source).__name__}")
        self.is_fallback = not source
        self.source = FALLBACK_CHATML_TEMPLATE if self.is_fallback else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._template = _compile(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        max_chars: int | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text. `extra` reaches the template as variables (tools, documents, ...);
        `max_chars` caps the output (see `render_bounded`)."""
        clean = validate_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update({k: _plain(v, k) for k, v in extra.items()})
        try:
            return render_bounded(
                self._template,
                max_chars,
                messages=clean,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except MemoryError:
            raise
        except Exception as e:
            raise template_failure(e) from e

    def __repr__(self) -> str:
        kind = "fallback ChatML" if self.is_fallback else f"{len(self.source)} chars"
        return f"ChatTemplate({kind})"


def apply_chat_template(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> str:
    """Render `messages` with the tokenizer's own template (ChatML if it has none)."""
    template = ChatTemplate(
        tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or ""
    )
    return template.render(messages, add_generation_prompt=add_generation_prompt)


def is_base_model(loaded: Any) -> bool:
    """No chat template in the file, and no ChatML tokens to fall back on (Gemma 3 270M, a
    pre-trained base model): a prompt is text to continue, not a chat turn."""
    template, tokenizer = loaded.chat_template, loaded.tokenizer
    return template.is_fallback and tokenizer.token_to_id("<|im_start|>") is None


def continuation(messages: Sequence[Mapping[str, Any]], system: bool = True) -> str:
    """A base model's prompt: the conversation's texts one after another, as one document
    (`system=False` leaves out system messages, which a base model would only continue)."""
    return "".join(m["content"] for m in messages if system or m["role"] != "system")
