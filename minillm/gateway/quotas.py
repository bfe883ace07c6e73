"""Per-key limits: requests per minute and tokens per minute, over a sliding 60 s window.

Like Higress's ai-token-ratelimit: a request is checked when it arrives (is the key already
over a limit?), and charged its real tokens when the upstream's `usage` tells them, which for
a stream is at its end. So one request may take a key past its token limit; the next waits.
A refused request gets 429 with Retry-After: the seconds until enough of the window has
passed for the key to be under its limits again.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from minillm.gateway.config import KeyPolicy

WINDOW_S = 60.0


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)  # arrival times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    token_sum: int = 0


@dataclass(frozen=True)
class Refusal:
    limit: str  # "requests_per_minute" or "tokens_per_minute"
    retry_after: int  # whole seconds, >= 1
    message: str


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.usage: dict[str, _Usage] = {}

    def _window(self, name: str, now: float) -> _Usage:
        u = self.usage.setdefault(name, _Usage())
        while u.requests and u.requests[0] <= now - WINDOW_S:
            u.requests.popleft()
        while u.tokens and u.tokens[0][0] <= now - WINDOW_S:
            u.token_sum -= u.tokens.popleft()[1]
        return u

    def admit(self, policy: KeyPolicy) -> Refusal | None:
        """Count one request for the key, or say why it must wait (nothing is counted then)."""
        now = self.clock()
        u = self._window(policy.name, now)
        rpm, tpm = policy.requests_per_minute, policy.tokens_per_minute
        if rpm is not None and len(u.requests) >= rpm:
            wait = u.requests[len(u.requests) - rpm] + WINDOW_S - now
            return Refusal(
                "requests_per_minute",
                whole_seconds(wait),
                f"rate limit: key {policy.name} has made {len(u.requests)} requests in the "
                f"last minute (limit {rpm}); retry in {whole_seconds(wait)} s",
            )
        if tpm is not None and u.token_sum >= tpm:
            excess, wait = u.token_sum - tpm, 0.0
            for t, n in u.tokens:  # the oldest charges leave the window first
                excess -= n
                wait = t + WINDOW_S - now
                if excess < 0:
                    break
            return Refusal(
                "tokens_per_minute",
                whole_seconds(wait),
                f"rate limit: key {policy.name} has used {u.token_sum} tokens in the last "
                f"minute (limit {tpm}); retry in {whole_seconds(wait)} s",
            )
        u.requests.append(now)
        return None

    def charge(self, policy: KeyPolicy, tokens: int) -> None:
        """Tokens a finished request used (prompt + completion, from the upstream's usage)."""
        if tokens <= 0:
            return
        u = self._window(policy.name, self.clock())
        u.tokens.append((self.clock(), tokens))
        u.token_sum += tokens


def whole_seconds(seconds: float) -> int:
    """HTTP's Retry-After is whole seconds; never 0 while a limit still holds."""
    return max(1, math.ceil(seconds))
