"""JSON request bodies: parsed once per request, off the event loop when big, and checked.

FastAPI parses a JSON body on the event loop, where a few megabytes stall every other client;
here a body over OFF_LOOP_BYTES is parsed in a worker thread. Every route of the two APIs uses
CheckedJSONRoute, so every endpoint gets the same checks, each a 400 that names the place:

- nesting deeper than MAX_DEPTH: no request of these APIs is that deep, and deep data turns
  recursive code (validation, templates, error messages) into a RecursionError;
- a lone UTF-16 surrogate (`"a\\ud800b"`): valid JSON, but not Unicode text, so no tokenizer
  can encode it (a surrogate must be half of a pair, as in `"\\ud83d\\ude00"`);
- bytes that are not UTF-8.

Invalid JSON keeps FastAPI's own handling (a 422, or 400 for Ollama, "not valid JSON").
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from minillm.serve.errors import APIError

MAX_DEPTH = 64
OFF_LOOP_BYTES = 64 << 10
_SURROGATE = re.compile("[\\ud800-\\udfff]")


def parse_json_body(body: bytes) -> Any:
    """The body's JSON value, checked (see the module docstring); APIError when refused."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise APIError(
            400, f"the request body is nested more than {MAX_DEPTH} levels deep"
        ) from None
    except UnicodeDecodeError as e:
        raise APIError(
            400,
            f"the request body is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start})",
        ) from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and lone surrogates, naming where they are."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict | list):
            if len(path) >= MAX_DEPTH:
                raise APIError(
                    400,
                    f"{_where(path)} is nested more than {MAX_DEPTH} levels deep",
                    _param(path),
                )
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, path)  # a bad key is reported where its object is
                stack.append((child, (*path, key)))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    m = _SURROGATE.search(text)
    if m is not None:
        raise APIError(
            400,
            f"{_where(path)} contains a lone UTF-16 surrogate (\\u{ord(m.group()):04x} at "
            f"character {m.start()}), which is not valid Unicode text; a surrogate escape "
            "must be half of a pair, as in \\ud83d\\ude00",
            _param(path),
        )


def _where(path: tuple[str | int, ...]) -> str:
    if not path:
        return "the request body"
    out = str(path[0])
    for key in path[1:6]:
        out += f"[{key}]" if isinstance(key, int) else f".{key}"
    return out + ("..." if len(path) > 6 else "")


def _param(path: tuple[str | int, ...]) -> str | None:
    return path[0] if path and isinstance(path[0], str) else None


class CheckedJSONRequest(Request):
    """A Request whose `json()` is `parse_json_body`, in a worker thread for a big body."""

    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            body = await self.body()
            if len(body) > OFF_LOOP_BYTES:
                self._checked_json = await asyncio.to_thread(parse_json_body, body)
            else:
                self._checked_json = parse_json_body(body)
        return self._checked_json


class CheckedJSONRoute(APIRoute):
    """An APIRoute whose handler reads the body as a CheckedJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedJSONRequest(request.scope, request.receive))

        return checked
