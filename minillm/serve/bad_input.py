"""The bad-input matrix: requests `minillm serve` must refuse with a clear 4xx.

Shared by tests/test_serve_errors.py (each case, then a good request on the same server) and
benchmarks/probe_bad_input.py (every case while good streams run and a prober watches the
event loop). Each case names the status and the words its error message must contain; the
error must be shaped like the API of its path (OpenAI: {"error": {"message", "type", "param",
"code"}}; Ollama: {"error": "..."}).

The cases assume the server `case_app` builds: the tiny test model with a 64-token context,
API key KEY, model name MODEL, a small body limit, `n` up to MAX_N, MAX_SEQUENCES sequences in
flight, and ALLOWED_ORIGIN as the one allowed web origin.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

KEY = "sk-test-errors"
MODEL = "tiny"
MAX_BODY_BYTES = 256 << 10
MAX_N = 4
MAX_SEQUENCES = 32
ALLOWED_ORIGIN = "https://allowed.example"
LLM_KWARGS: dict[str, Any] = dict(
    backend="ref", block_size=4, kv_cache_memory="4MiB", max_model_len=64
)
APP_KWARGS: dict[str, Any] = dict(
    api_key=KEY,
    served_model_name=MODEL,
    max_body_bytes=MAX_BODY_BYTES,
    max_n=MAX_N,
    max_queued_requests=MAX_SEQUENCES,
    allowed_origins=[ALLOWED_ORIGIN],
)

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hello"}]
LONG = "the quick brown fox " * 40  # far more than 64 tokens
RUNAWAY = "{% for i in range(100000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"


def case_app(llm: Any) -> Any:
    """The app the cases assume (see the module docstring)."""
    from minillm.serve import build_app

    return build_app(llm, **APP_KWARGS)


@dataclass(frozen=True)
class BadInput:
    """One request and what the server must answer.

    body: a JSON value (sent as JSON), bytes (sent as they are) or None (no body).
    param: the OpenAI error's `param` (checked on /v1 paths only).
    """

    name: str
    path: str
    body: Any
    status: int
    needle: str
    param: str | None = None
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: bool = True
    chunked: bool = False


def _nested(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = {"x": leaf}
    return leaf


def _deep_list(levels: int) -> Any:
    leaf: Any = "x"
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def _gen(template: str) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "stream": False, "template": template}


def _surrogate_json(path: str) -> bytes:
    """A body with the JSON escape \\ud800 (a lone surrogate) in its text field."""
    if path == CHAT:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a@b"}], "max_tokens": 2}
    elif path == "/v1/completions":
        body = {"model": MODEL, "prompt": "a@b", "max_tokens": 2}
    elif path == "/v1/embeddings":
        body = {"model": MODEL, "input": "a@b"}
    elif path == "/api/generate":
        body = {"model": MODEL, "prompt": "a@b", "stream": False}
    elif path == "/api/chat":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a@b"}], "stream": False}
    else:  # /api/embed
        body = {"model": MODEL, "input": "a@b"}
    return json.dumps(body).replace("a@b", "a\\ud800b").encode()


_BIG = b'{"model": "tiny", "prompt": "' + b"x" * (MAX_BODY_BYTES + 1024) + b'"}'

CASES: list[BadInput] = [
    # ------------------------------------------------------------------ JSON and types
    BadInput("not json", CHAT, b"{not json", 422, "not valid JSON"),
    BadInput("json array", CHAT, b"[1, 2]", 422, "JSON object"),
    BadInput("no messages", CHAT, {"model": MODEL}, 422, "messages: Field required", "messages"),
    BadInput(
        "empty messages",
        CHAT,
        {"model": MODEL, "messages": []},
        400,
        "messages is empty",
        "messages",
    ),
    BadInput(
        "messages str",
        CHAT,
        {"model": MODEL, "messages": "hello"},
        422,
        "messages: Input should be a valid list",
        "messages",
    ),
    BadInput(
        "unknown role",
        CHAT,
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "unknown role 'wizard'",
        "messages",
    ),
    BadInput(
        "content int",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "content must be a str",
        "messages",
    ),
    BadInput(
        "temperature str",
        CHAT,
        {"model": MODEL, "messages": MSGS, "temperature": "hot"},
        422,
        "temperature",
        "temperature",
    ),
    BadInput(
        "max_tokens float",
        CHAT,
        {"model": MODEL, "messages": MSGS, "max_tokens": 1.5},
        422,
        "max_tokens",
        "max_tokens",
    ),
    # ------------------------------------------------------------------ values
    BadInput(
        "temperature < 0",
        CHAT,
        {"model": MODEL, "messages": MSGS, "temperature": -0.5},
        400,
        "temperature must be >= 0",
        "temperature",
    ),
    BadInput(
        "top_p > 1",
        CHAT,
        {"model": MODEL, "messages": MSGS, "top_p": 1.5},
        400,
        "top_p must be in (0, 1]",
        "top_p",
    ),
    BadInput(
        "presence_penalty 3",
        CHAT,
        {"model": MODEL, "messages": MSGS, "presence_penalty": 3},
        400,
        "presence_penalty must be in [-2, 2]",
        "presence_penalty",
    ),
    BadInput(
        "n 0", CHAT, {"model": MODEL, "messages": MSGS, "n": 0}, 400, "n must be at least 1", "n"
    ),
    BadInput(
        "max_tokens 0",
        CHAT,
        {"model": MODEL, "messages": MSGS, "max_tokens": 0},
        400,
        "max_tokens must be at least 1",
        "max_tokens",
    ),
    BadInput(
        "top_logprobs 50",
        CHAT,
        {"model": MODEL, "messages": MSGS, "logprobs": True, "top_logprobs": 50},
        400,
        "logprobs must be None or in [0, 20]",
        "logprobs",
    ),
    BadInput(
        "top_logprobs alone",
        CHAT,
        {"model": MODEL, "messages": MSGS, "top_logprobs": 2},
        400,
        "top_logprobs requires logprobs=true",
        "top_logprobs",
    ),
    BadInput(
        "unknown model",
        CHAT,
        {"model": "gpt-4", "messages": MSGS},
        404,
        "'gpt-4' does not exist",
        "model",
    ),
    BadInput(
        "prompt too long",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": LONG}]},
        400,
        "context length is 64 tokens",
        "messages",
    ),
    BadInput(
        "max_tokens too large",
        CHAT,
        {"model": MODEL, "messages": MSGS, "max_tokens": 1000},
        400,
        "max_tokens=1000 is too large",
        "max_tokens",
    ),
    BadInput(
        "logit_bias",
        CHAT,
        {"model": MODEL, "messages": MSGS, "logit_bias": {"5": 1.0}},
        400,
        "logit_bias is not supported",
        "logit_bias",
    ),
    BadInput(
        "completions no prompt",
        "/v1/completions",
        {"model": MODEL},
        422,
        "prompt: Field required",
        "prompt",
    ),
    BadInput(
        "completions empty prompt",
        "/v1/completions",
        {"model": MODEL, "prompt": []},
        400,
        "prompt is empty",
        "prompt",
    ),
    BadInput(
        "token id out of vocab",
        "/v1/completions",
        {"model": MODEL, "prompt": [999999]},
        400,
        "token ids must be in",
        "prompt",
    ),
    BadInput(
        "completions too long",
        "/v1/completions",
        {"model": MODEL, "prompt": LONG},
        400,
        "context length is 64",
        "prompt",
    ),
    BadInput(
        "empty stop",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "stop": [""]},
        400,
        "stop strings must not be empty",
        "stop",
    ),
    BadInput(
        "embedding too long",
        "/v1/embeddings",
        {"model": MODEL, "input": LONG},
        400,
        "context length is 64",
        "input",
    ),
    BadInput(
        "embedding dimensions",
        "/v1/embeddings",
        {"model": MODEL, "input": "x", "dimensions": 3},
        400,
        "dimensions",
        "dimensions",
    ),
    BadInput("no route", "/v1/nothing-here", {}, 404, "no route POST /v1/nothing-here"),
    # ------------------------------------------------------------------ fan-out
    BadInput(
        "n over the limit",
        CHAT,
        {"model": MODEL, "messages": MSGS, "n": 1000},
        400,
        f"n=1000 is too large: this server returns at most {MAX_N}",
        "n",
    ),
    BadInput(
        "stream n over the limit",
        CHAT,
        {"model": MODEL, "messages": MSGS, "n": 50, "stream": True},
        400,
        "n=50 is too large",
        "n",
    ),
    BadInput(
        "prompts x n over the limit",
        "/v1/completions",
        {"model": MODEL, "prompt": ["a"] * 9, "n": MAX_N, "max_tokens": 1},
        400,
        f"needs {9 * MAX_N} sequences (9 prompts x n={MAX_N})",
        "n",
    ),
    # ------------------------------------------------------------------ text that is not text
    *(
        BadInput(
            f"lone surrogate {p}",
            p,
            _surrogate_json(p),
            400,
            "lone UTF-16 surrogate (\\ud800",
            param,
        )
        for p, param in (
            (CHAT, "messages"),
            ("/v1/completions", "prompt"),
            ("/v1/embeddings", "input"),
            ("/api/generate", None),
            ("/api/chat", None),
            ("/api/embed", None),
        )
    ),
    BadInput(
        "lone surrogate in a key",
        CHAT,
        b'{"model": "tiny", "messages": [], "\\udc00": 1}',
        400,
        "lone UTF-16 surrogate (\\udc00",
    ),
    BadInput(
        "not UTF-8",
        CHAT,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}',
        400,
        "not valid UTF-8 (byte 0xff",
    ),
    # ------------------------------------------------------------------ nesting
    BadInput(
        "message nested 500 deep",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": "hi", "meta": _nested(500, 1)}]},
        400,
        "nested more than 64 levels deep",
        "messages",
    ),
    BadInput(
        "content nested 500 deep",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": _deep_list(500)}]},
        400,
        "nested more than 64 levels deep",
        "messages",
    ),
    BadInput(
        "body nested 100000 deep",
        CHAT,
        b"[" * 100000 + b"]" * 100000,
        400,
        "nested more than 64 levels deep",
    ),
    BadInput(
        "ollama options nested",
        "/api/chat",
        {"model": MODEL, "messages": MSGS, "options": _nested(200, 1)},
        400,
        "nested more than 64 levels deep",
    ),
    # ------------------------------------------------------------------ templates
    BadInput(
        "runaway template",
        "/api/generate",
        _gen(RUNAWAY),
        400,
        "template: the template took longer than",
    ),
    BadInput(
        "template output too long",
        "/api/generate",
        _gen("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"),
        400,
        "output is longer than",
    ),
    BadInput(
        "template divides by zero",
        "/api/generate",
        _gen("{{ 1 / (messages|length - 1) }}"),
        400,
        "ZeroDivisionError: division by zero",
    ),
    BadInput(
        "template raises",
        "/api/generate",
        _gen("{{ raise_exception('no system prompt') }}"),
        400,
        "no system prompt",
    ),
    BadInput(
        "template syntax",
        "/api/generate",
        _gen("{% if %}"),
        400,
        "template: chat template has a syntax error",
    ),
    BadInput(
        "template recursion",
        "/api/generate",
        _gen("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
        400,
        "RecursionError",
    ),
    BadInput(
        "go template",
        "/api/generate",
        _gen("{{ with .Prompt }}x{{ end }}"),
        400,
        "{{ with }} is not supported",
    ),
    # ------------------------------------------------------------------ size
    BadInput(
        "body over the limit",
        "/v1/completions",
        _BIG,
        413,
        f"accepts at most {MAX_BODY_BYTES >> 10} KiB",
    ),
    BadInput(
        "chunked body over the limit",
        "/v1/completions",
        _BIG,
        413,
        "the request body is too large",
        chunked=True,
    ),
    BadInput(
        "ollama body over the limit", "/api/generate", _BIG, 413, "the request body is too large"
    ),
    # ------------------------------------------------------------------ browsers
    BadInput(
        "foreign origin text/plain",
        "/api/generate",
        json.dumps({"model": MODEL, "prompt": "hi"}).encode(),
        403,
        "the web origin 'https://evil.example' is not allowed",
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
        auth=False,
    ),
    BadInput(
        "foreign origin json",
        CHAT,
        {"model": MODEL, "messages": MSGS},
        403,
        "is not allowed",
        headers={"origin": "http://evil.example:8000"},
    ),
    BadInput(
        "null origin",
        CHAT,
        {"model": MODEL, "messages": MSGS},
        403,
        "the web origin 'null'",
        headers={"origin": "null"},
    ),
    BadInput(
        "rebinding host",
        CHAT,
        {"model": MODEL, "messages": MSGS},
        403,
        "the Host header 'evil.example:8000' is not allowed",
        headers={"host": "evil.example:8000", "origin": "http://evil.example:8000"},
    ),
    BadInput(
        "form from a browser",
        CHAT,
        json.dumps({"model": MODEL, "messages": MSGS}).encode(),
        415,
        "must be JSON",
        headers={"origin": ALLOWED_ORIGIN, "content-type": "application/x-www-form-urlencoded"},
    ),
    BadInput(
        "text/plain from localhost page",
        "/api/chat",
        json.dumps({"model": MODEL, "messages": MSGS}).encode(),
        415,
        "'text/plain' from a browser",
        headers={"origin": "http://localhost:3000", "content-type": "text/plain"},
    ),
    BadInput(
        "xml",
        CHAT,
        b"<messages/>",
        415,
        "got 'application/xml'",
        headers={"content-type": "application/xml"},
    ),
    # ------------------------------------------------------------------ the key
    *(
        BadInput(f"{p} without the key", p, None, 401, "missing API key", method="GET", auth=False)
        for p in ("/docs", "/redoc", "/openapi.json", "/metrics", "/api/tags")
    ),
]
if sys.platform == "linux":  # elsewhere nothing caps the worker's memory: do not try this
    CASES.append(
        BadInput(
            "template memory bomb",
            "/api/generate",
            _gen("{{ '{:>9999999999}'.format(1) }}"),
            400,
            "MiB of memory",
        ),
    )


def _chunks(data: bytes, size: int = 64 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def send(client: httpx.Client, case: BadInput) -> httpx.Response:
    """Send `case` with `client` (its base_url is the server's)."""
    headers = {"content-type": "application/json"}
    if case.auth:
        headers["authorization"] = f"Bearer {KEY}"
    headers.update(case.headers)
    if case.body is None:
        content = None
    elif isinstance(case.body, bytes):
        content = case.body
    else:
        content = json.dumps(case.body).encode()
    if case.chunked and content is not None:
        return client.request(case.method, case.path, headers=headers, content=_chunks(content))
    return client.request(case.method, case.path, headers=headers, content=content)


def problems(case: BadInput, r: httpx.Response) -> list[str]:
    """What is wrong with the answer to `case` (empty: the clear 4xx it should be)."""
    found = []
    if r.status_code != case.status:
        found.append(f"status {r.status_code}, expected {case.status}")
    try:
        body = r.json()
    except ValueError:
        return [*found, f"not JSON: {r.text[:120]!r}"]
    err = body.get("error") if isinstance(body, dict) else None
    if case.path.startswith("/api/"):
        if not isinstance(err, str) or set(body) != {"error"}:
            return [*found, f"not an Ollama error: {str(body)[:120]}"]
        message = err
    else:
        if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
            return [*found, f"not an OpenAI error: {str(body)[:120]}"]
        message = err["message"]
        if err["code"] != case.status:
            found.append(f"code {err['code']}")
        if err["param"] != case.param:
            found.append(f"param {err['param']!r}, expected {case.param!r}")
    if case.needle not in message:
        found.append(f"message {message[:200]!r} lacks {case.needle!r}")
    return found
