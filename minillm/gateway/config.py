"""What the gateway routes to, and how: built from CLI flags, a YAML file, or Python.

    upstreams:                    # any OpenAI-compatible server (minillm serve, vLLM,
      - url: http://127.0.0.1:8001  # llama.cpp's server, Ollama's /v1, a PD pair)
        name: a                   # default: host:port
        weight: 2                 # share of traffic for round robin / least requests / hashing
        api_key: sk-upstream      # sent upstream instead of the client's key
        models: [smollm2]         # skip discovery from /v1/models (servers without it)
        health_path: /health      # Ollama: /api/version
    strategy: prefix-affinity     # round-robin | least-requests | prefix-affinity
    routes:                       # model -> the upstreams allowed to serve it
      smollm2: [a]
    aliases:                      # a name clients may use -> the model it means
      gpt-4o-mini: smollm2
    fallbacks:                    # model -> models tried, in order, when none of its upstreams can
      smollm2: [tiny]
    keys:                         # API keys of the gateway; none: the gateway is open
      sk-alice: {name: alice, requests_per_minute: 60, tokens_per_minute: 20000}
      sk-bob: {}
    health: {interval: 5, timeout: 2, unhealthy_after: 2, healthy_after: 2,
             eject_after: 3, eject_seconds: 10}
    retries: 2                    # more upstreams tried per model after a failure
    connect_timeout: 3
    first_byte_timeout: 120       # an upstream silent this long counts as failed (retried)
    prefix_chars: 256             # leading prompt text hashed by prefix-affinity

Everything is checked here, so a typo in a file is a ValueError naming the field, not a
surprise at the first request.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

STRATEGIES = ("round-robin", "least-requests", "prefix-affinity")


@dataclass(frozen=True)
class UpstreamSpec:
    """One OpenAI-compatible server. `url` is its base, without the /v1."""

    url: str
    name: str = ""
    weight: int = 1
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    health_path: str = "/health"

    def __post_init__(self) -> None:
        url = self.url.rstrip("/")
        if url.endswith("/v1"):  # people paste the SDK's base_url
            url = url[: -len("/v1")]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream url {self.url!r} must look like http://host:port")
        object.__setattr__(self, "url", url)
        if not self.name:
            object.__setattr__(self, "name", parts.netloc)
        if not isinstance(self.weight, int) or self.weight < 1:
            raise ValueError(f"upstream {self.name}: weight must be an integer >= 1")
        if self.models is not None:
            object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        if not self.health_path.startswith("/"):
            raise ValueError(f"upstream {self.name}: health_path must start with '/'")


@dataclass(frozen=True)
class KeyPolicy:
    """An API key of the gateway and its per-minute limits (None: unlimited)."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for f in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"key {self.name}: {f} must be an integer >= 1")


@dataclass(frozen=True)
class HealthPolicy:
    """Active checks every `interval` s; passive ejection after `eject_after` failed requests.

    unhealthy_after / healthy_after consecutive check results change an upstream's state, so
    a flapping check (ok, fail, ok, ...) does not flip it on every probe."""

    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2
    healthy_after: int = 2
    eject_after: int = 3
    eject_seconds: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"health.{f.name} must be a number > 0 (got {value!r})")


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple[UpstreamSpec, ...]
    strategy: str = "round-robin"
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keys: dict[str, KeyPolicy] = field(default_factory=dict)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    retries: int = 2
    connect_timeout: float = 3.0
    first_byte_timeout: float = 120.0
    prefix_chars: int = 256

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("the gateway needs at least one upstream (--upstream URL)")
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstream names must be unique: {', '.join(dupes)} repeats")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for model, allowed in self.routes.items():
            unknown = [n for n in allowed if n not in names]
            if unknown:
                raise ValueError(f"routes.{model} names unknown upstreams: {', '.join(unknown)}")
        for alias, target in self.aliases.items():
            if target in self.aliases:
                raise ValueError(f"alias {alias!r} points at another alias {target!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError("retries must be an integer >= 0")
        for f in ("connect_timeout", "first_byte_timeout"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be > 0")
        if not isinstance(self.prefix_chars, int) or self.prefix_chars < 1:
            raise ValueError("prefix_chars must be an integer >= 1")

    def resolve(self, model: str) -> str:
        """The model an alias means (a name that is no alias means itself)."""
        return self.aliases.get(model, model)

    def chain(self, model: str) -> list[str]:
        """The model, then its fallbacks, each once."""
        first = self.resolve(model)
        out = [first]
        for m in self.fallbacks.get(first, ()):
            if self.resolve(m) not in out:
                out.append(self.resolve(m))
        return out


# ---------------------------------------------------------------------------- from a file / flags
_TOP = {
    "upstreams",
    "strategy",
    "routes",
    "aliases",
    "fallbacks",
    "keys",
    "health",
    "retries",
    "connect_timeout",
    "first_byte_timeout",
    "prefix_chars",
}


def from_dict(data: dict[str, Any]) -> GatewayConfig:
    """A config from parsed YAML/JSON; unknown fields are errors (typos must not pass)."""
    if not isinstance(data, dict):
        raise ValueError("the gateway config must be a mapping (YAML key: value pairs)")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise ValueError(f"unknown gateway config field(s): {', '.join(unknown)}")
    ups = []
    for i, u in enumerate(data.get("upstreams") or []):
        if isinstance(u, str):
            u = {"url": u}
        if not isinstance(u, dict) or "url" not in u:
            raise ValueError(f"upstreams[{i}] needs a url")
        ups.append(_build(UpstreamSpec, u, f"upstreams[{i}]"))
    keys = {}
    for key, policy in (data.get("keys") or {}).items():
        policy = dict(policy or {})
        policy.setdefault("name", mask_key(str(key)))
        keys[str(key)] = _build(KeyPolicy, policy, f"keys.{mask_key(str(key))}")
    kwargs: dict[str, Any] = {
        "upstreams": tuple(ups),
        "routes": {str(m): tuple(v) for m, v in (data.get("routes") or {}).items()},
        "aliases": {str(a): str(m) for a, m in (data.get("aliases") or {}).items()},
        "fallbacks": {str(m): tuple(v) for m, v in (data.get("fallbacks") or {}).items()},
        "keys": keys,
        "health": _build(HealthPolicy, data.get("health") or {}, "health"),
    }
    for name in ("strategy", "retries", "connect_timeout", "first_byte_timeout", "prefix_chars"):
        if name in data:
            kwargs[name] = data[name]
    return GatewayConfig(**kwargs)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return cls(**values)


def load_config(path: str | Path) -> GatewayConfig:
    import yaml  # PyYAML: only a config file needs it

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    return from_dict(data or {})


def from_args(args: argparse.Namespace) -> GatewayConfig:
    """--config first, then flags on top: --upstream adds, --strategy and --api-key replace."""
    base = load_config(args.config) if args.config else None
    extra = tuple(UpstreamSpec(url=u) for u in args.upstream or [])
    upstreams = (base.upstreams if base else ()) + extra
    if base is None:
        config = GatewayConfig(upstreams=upstreams, strategy=args.strategy or "round-robin")
    else:
        config = replace(base, upstreams=upstreams, strategy=args.strategy or base.strategy)
    if args.api_key:
        keys = {k: config.keys.get(k, KeyPolicy(name=mask_key(k))) for k in args.api_key}
        config = replace(config, keys=keys)
    return config


def mask_key(key: str) -> str:
    """A key as metrics and logs show it: enough to tell keys apart, not to use one."""
    return key if len(key) <= 8 else f"{key[:5]}…{key[-2:]}"
