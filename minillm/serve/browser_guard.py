"""What a web page may do with this server: Host and Origin checks, and JSON-only bodies.

A server on 127.0.0.1 without a key is still reachable from every page the user's browser opens:
a page can POST to http://127.0.0.1:8000 (a "simple" cross-site request needs no permission),
and a page whose name the attacker re-points at 127.0.0.1 (DNS rebinding) can even read the
replies. The rules, like Ollama's (OLLAMA_ORIGINS):

1. Host: a request that arrived over loopback must name a loopback host (`localhost`,
   `*.localhost`, `127.x.x.x`, `[::1]`) or an allowed one in its Host header. A rebinding page
   sends its own name there. (A server opened with `--host 0.0.0.0` is reached by other names
   on purpose; there, `--api-key` is the protection.)
2. Origin: browsers send it with every cross-site request (and with every POST). It must be a
   loopback origin (http or https, any port), the server's own origin (same Host), or an
   allowed one; anything else, `null` included, is a 403. Requests without an Origin (curl,
   SDKs, scripts) are not from a browser and pass.
3. Content-Type: the JSON endpoints read JSON. `application/json` (`text/json`, `...+json`)
   and no Content-Type at all are always accepted. The three types a page can send without asking
   first (`text/plain`, `application/x-www-form-urlencoded`, `multipart/form-data`) are
   accepted only without an Origin, because `curl -d '{...}'` (how Ollama's docs call the API)
   labels its JSON as a form; from a browser they are a 415, so a page can only send JSON,
   which needs the browser's CORS preflight, which only allowed origins pass. Any other type
   is a 415. Accepted bodies are relabelled application/json for FastAPI.

Allowed origins come from `build_app(allowed_origins=[...])`, `minillm serve --allowed-origins`
and the MINILLM_ORIGINS environment variable (comma-separated). An entry is an origin
(`https://chat.example.com`), a pattern (`https://*.example.com`, `*` for any), `null`, or a
bare host name (`mybox.lan`: any origin on that host); its host is also accepted in Host.
Allowed origins also get CORS headers, so their pages can read the replies.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware

from minillm.serve.errors import error_response

ORIGINS_ENV = "MINILLM_ORIGINS"
JSON_TYPES = ("application/json", "text/json")
# what a page may send cross-site without a CORS preflight (the Fetch standard's safelist)
SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback_host(host: str) -> bool:
    """`localhost`, `*.localhost`, or a loopback IP address (v4, v6, v4-mapped v6)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def split_host(value: str) -> str:
    """The host part of a Host header value: "[::1]:8000" -> "::1", "a.b:80" -> "a.b"."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class OriginPolicy:
    """Which origins and Host names are allowed (see the module docstring)."""

    def __init__(self, allowed: Iterable[str] = (), read_env: bool = True) -> None:
        entries = [a.strip() for a in allowed if a and a.strip()]
        if read_env:
            entries += [a.strip() for a in os.environ.get(ORIGINS_ENV, "").split(",") if a.strip()]
        self.entries = entries
        self.any = "*" in entries
        self.origin_patterns: list[str] = []
        self.host_patterns: list[str] = []
        for entry in entries:
            entry = entry.lower().rstrip("/")
            if "://" in entry:
                self.origin_patterns.append(entry)
                host = urlsplit(entry.replace("*", "wildcard-x")).hostname
                if host:
                    self.host_patterns.append(host.replace("wildcard-x", "*"))
            elif entry == "null":
                self.origin_patterns.append(entry)
            elif entry != "*":  # a bare host name
                self.origin_patterns.append(f"*://{entry}")
                self.origin_patterns.append(f"*://{entry}:*")
                self.host_patterns.append(entry)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return (
            self.any
            or is_loopback_host(host)
            or any(fnmatch.fnmatchcase(host, p) for p in self.host_patterns)
        )

    def origin_allowed(self, origin: str, host_header: str | None = None) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.any or any(fnmatch.fnmatchcase(origin, p) for p in self.origin_patterns):
            return True
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.hostname:
            if is_loopback_host(parts.hostname):
                return True
            if host_header and parts.netloc == host_header.strip().lower():
                return True  # same origin: the server's own pages (e.g. /docs)
        return False


class BrowserGuardMiddleware:
    """Rules 1-3 of the module docstring, before anything else reads the request."""

    def __init__(self, app: Any, policy: OriginPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        problem = self._refusal(scope, host, origin)
        if problem is not None:
            status, message = problem
            await error_response(scope.get("path", ""), status, message)(scope, receive, send)
            return
        if scope.get("method") in BODY_METHODS:
            rest = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict, host: str, origin: str | None) -> tuple[int, str] | None:
        """(status, message) when the request must be refused, else None."""
        server = scope.get("server") or ("localhost", None)
        arrived_on_loopback = server[1] is None or is_loopback_host(str(server[0]))
        if host and arrived_on_loopback and not self.policy.host_allowed(split_host(host)):
            return 403, (
                f"the Host header {host!r} is not allowed: a request that reaches this server "
                "over loopback must name a loopback host such as localhost (this protects "
                "against DNS rebinding); allow the name with --allowed-origins or "
                f"{ORIGINS_ENV}"
            )
        if origin is not None and not self.policy.origin_allowed(origin, host):
            return 403, (
                f"the web origin {origin!r} is not allowed to call this server; allow it "
                f"with --allowed-origins or {ORIGINS_ENV} (loopback origins always are)"
            )
        if scope.get("method") in BODY_METHODS:
            return _content_type_refusal(scope, origin)
        return None


def _content_type_refusal(scope: dict, origin: str | None) -> tuple[int, str] | None:
    raw = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
    media = raw.split(";", 1)[0].strip().lower()
    if not media or media in JSON_TYPES or media.endswith("+json"):
        return None
    if media in SIMPLE_TYPES and origin is None:
        return None  # curl -d: the body is JSON whatever the label says
    why = " from a browser" if media in SIMPLE_TYPES else ""
    return (
        415,
        f"the request body must be JSON (Content-Type: application/json), got {media!r}{why}",
    )


class PolicyCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling (preflights, response headers) for the origins `policy`
    allows, so their pages can read the replies."""

    def __init__(self, app: Any, policy: OriginPolicy) -> None:
        super().__init__(app, allow_methods=["*"], allow_headers=["*"], allow_private_network=True)
        self.policy = policy

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.origin_allowed(origin)
