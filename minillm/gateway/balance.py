"""Choosing an upstream among those that serve a model.

- round-robin: each in turn, `weight` turns each (smooth weighted round robin, as nginx does,
  so a weight-3 upstream gets its 3 turns spread out, not in a burst);
- least-requests: the fewest requests in flight per unit of weight (LiteLLM's least_busy);
- prefix-affinity: consistent hashing of the prompt's leading text. Requests that share a
  system prompt hash alike and reach the same upstream, whose prefix cache already holds
  that prompt's KV blocks; adding or losing an upstream moves only the keys it owned. An
  upstream that already carries more than `load_factor` × its fair share of the in-flight
  requests, plus `slack` requests, is passed over for the next one on the ring (consistent
  hashing with bounded loads), so one popular prompt cannot pin all traffic on one box. The
  slack keeps chance from breaking affinity when few requests are in flight: with two
  upstreams and four clients, 1.5 × the fair share is 3, which three requests landing on one
  prompt's owner reach by chance; without slack the benchmark's system prompts were answered by
  1.5 upstreams each instead of 1, and half the prefix-cache benefit was lost.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Protocol

from minillm.gateway.upstreams import Upstream


class Balancer(Protocol):
    def choose(self, candidates: Sequence[Upstream], key: str) -> Upstream:
        """One of `candidates` (never empty); `key` is the prompt's leading text."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self.current: dict[str, int] = {}  # upstream name -> smooth-WRR credit

    def choose(self, candidates: Sequence[Upstream], key: str) -> Upstream:
        total = sum(u.spec.weight for u in candidates)
        best = None
        for u in candidates:
            self.current[u.name] = self.current.get(u.name, 0) + u.spec.weight
            if best is None or self.current[u.name] > self.current[best.name]:
                best = u
        assert best is not None
        self.current[best.name] -= total
        return best


class LeastRequests:
    def __init__(self) -> None:
        self.tie = RoundRobin()  # equal loads take turns instead of all going to the first

    def choose(self, candidates: Sequence[Upstream], key: str) -> Upstream:
        load = min(u.in_flight / u.spec.weight for u in candidates)
        return self.tie.choose([u for u in candidates if u.in_flight / u.spec.weight == load], key)


def stable_hash(text: str) -> int:
    """64 bits of blake2b: the same on every run and machine (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PrefixAffinity:
    """A hash ring with `replicas` × weight points per upstream."""

    def __init__(self, replicas: int = 64, load_factor: float = 1.5, slack: int = 2) -> None:
        self.replicas, self.load_factor, self.slack = replicas, load_factor, slack
        self.rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def ring(self, candidates: Sequence[Upstream]) -> tuple[list[int], list[str]]:
        names = tuple(sorted(u.name for u in candidates))
        if names not in self.rings:
            weights = {u.name: u.spec.weight for u in candidates}
            points = sorted(
                (stable_hash(f"{n}#{i}"), n)
                for n in names
                for i in range(self.replicas * weights[n])
            )
            self.rings[names] = ([h for h, _ in points], [n for _, n in points])
        return self.rings[names]

    def choose(self, candidates: Sequence[Upstream], key: str) -> Upstream:
        hashes, owners = self.ring(candidates)
        by_name = {u.name: u for u in candidates}
        total_weight = sum(u.spec.weight for u in candidates)
        in_flight = sum(u.in_flight for u in candidates)
        start = bisect.bisect(hashes, stable_hash(key)) % len(hashes)
        seen: list[Upstream] = []
        for i in range(len(hashes)):
            u = by_name[owners[(start + i) % len(hashes)]]
            if u in seen:
                continue
            seen.append(u)
            # bounded load: its fair share of the requests in flight, this one included
            cap = self.load_factor * (in_flight + 1) * u.spec.weight / total_weight
            if u.in_flight + 1 <= max(cap, 1) + self.slack:
                return u
            if len(seen) == len(candidates):
                break
        return seen[0]  # everyone is over the bound: keep the affinity


def make_balancer(strategy: str) -> Balancer:
    if strategy == "round-robin":
        return RoundRobin()
    if strategy == "least-requests":
        return LeastRequests()
    if strategy == "prefix-affinity":
        return PrefixAffinity()
    raise ValueError(f"unknown strategy {strategy!r}")
