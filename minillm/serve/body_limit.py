"""A request body size limit (`build_app(max_body_bytes=...)`, `minillm serve --max-body-size`).

A prompt that fills even a 128K-token context is well under 1 MB of JSON, so the default of
8 MiB only stops bodies that are a mistake or an attack. The limit is checked as the body
arrives: a Content-Length over it is refused before a byte is read, a chunked body as soon as
its running total passes it. The answer is a 413 shaped like the API's other errors.

The middleware reads the whole (allowed) body itself and hands it to the app in one piece,
which is what FastAPI does with a JSON body anyway.
"""

from __future__ import annotations

from typing import Any

from minillm.serve.errors import error_response

DEFAULT_MAX_BODY_BYTES = 8 << 20
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# After refusing, read and drop at most this much more of the body, so a client still sending
# it sees the 413 instead of a reset connection; past it the connection is simply closed.
DRAIN_LIMIT_BYTES = 64 << 20


def human_size(n: int) -> str:
    """8388608 -> "8 MiB", 1536 -> "1.5 KiB", 100 -> "100 bytes"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`; otherwise the app gets the body as one message."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        handed_over = False

        async def replay() -> dict:
            nonlocal handed_over
            if not handed_over:
                handed_over = True
                return whole
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: str) -> None:
        message = (
            f"the request body is too large: {size}, and this server accepts at most "
            f"{human_size(self.max_bytes)} (minillm serve --max-body-size)"
        )
        await error_response(scope.get("path", ""), 413, message)(scope, receive, send)
        drained = 0
        while drained < DRAIN_LIMIT_BYTES:
            message_in = await receive()
            if message_in["type"] != "http.request" or not message_in.get("more_body", False):
                return
            drained += len(message_in.get("body", b""))


def _content_length(scope: dict) -> int | None:
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
