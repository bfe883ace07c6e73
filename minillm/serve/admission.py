"""Capacity: a request is admitted for the sequences it will run, before any header is sent.

The limit counts sequences, not requests: `n=4` runs four, a completions request with three
prompts and `n=2` runs six. A request is admitted (or refused with a 503) in its handler, after
its body was checked and before the handler returns, so a streaming client that is turned away
gets a 503 status, not a 200 followed by an error event. The admission is released when the
response is done: for a stream, when it has been sent or the client left.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import StreamingResponse


class Admission:
    """Sequences one request holds against the server's limit; `release()` is idempotent."""

    def __init__(self, counter: Any, sequences: int) -> None:
        self.counter, self.sequences, self.released = counter, sequences, False
        counter.in_flight += sequences

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.counter.in_flight -= self.sequences

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdmittedStreamingResponse(StreamingResponse):
    """A StreamingResponse that releases its admission once it is over, however it ended
    (sent to the end, failed, or the client left)."""

    def __init__(self, content: Any, admission: Admission, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.admission = admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release()
