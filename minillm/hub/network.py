"""Where ModelScope and the HF hub live, and a quick "can we reach them at all?" check.

The source libraries retry for minutes when the network is down. A TCP connect with a short
timeout answers the question in milliseconds (refused) or seconds (filtered), so `minillm pull`
can say plainly what is wrong before handing over to the library.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ENDPOINTS = {"modelscope": "https://www.modelscope.cn", "hf": "https://huggingface.co"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Endpoint:
    url: str
    origin: str  # the environment variable it came from, or "default"

    @property
    def from_env(self) -> bool:
        return self.origin != "default"


def _with_scheme(value: str) -> str:
    value = value.strip().rstrip("/")
    return value if "://" in value else f"https://{value}"


def source_endpoint(source: str) -> Endpoint:
    """The endpoint the source library will use, honouring the same environment variables."""
    env_vars = {
        "modelscope": ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"),
        "hf": ("HF_ENDPOINT",),
    }[source]
    for var in env_vars:
        if os.environ.get(var, "").strip():
            return Endpoint(_with_scheme(os.environ[var]), var)
    return Endpoint(DEFAULT_ENDPOINTS[source], "default")


def offline_reason(source: str) -> str | None:
    """Why the user has asked us not to use the network for this source, if they have."""
    if source != "hf":
        return None
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # huggingface_hub honours both
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set, so the Hugging Face hub is not contacted (offline mode)"
    return None


def _target(url: str) -> tuple[str, int, str]:
    """(host, port, description) to connect to: the proxy if one applies, else the endpoint."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(_with_scheme(proxy))
        return p.hostname or "", p.port or 8080, f"proxy {p.hostname}:{p.port or 8080}"
    return host, port, f"{host}:{port}"


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError | socket.timeout):
        return f"connection timed out after {timeout:g} s"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror or error})"
    return f"{type(error).__name__}: {error}"


def check_reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the endpoint (or its proxy) opens within ``timeout``;
    otherwise a short description of the problem. DNS runs in a thread so it is bounded too."""
    host, port, where = _target(url)
    if not host:
        return f"the endpoint {url!r} has no host name"
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported to the caller as text
            outcome.append(e)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if not outcome:
        return f"{where}: no answer within {timeout:g} s (DNS or connect hangs)"
    return None if outcome[0] is None else f"{where}: {_describe(outcome[0], timeout)}"
