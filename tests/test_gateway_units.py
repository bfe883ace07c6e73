"""The gateway's pure parts: config checks, balancers, quotas, the prefix-affinity key.

No server here; tests/test_gateway.py runs the gateway against real upstreams.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from minillm.gateway.balance import LeastRequests, PrefixAffinity, RoundRobin
from minillm.gateway.config import KeyPolicy, UpstreamSpec, from_dict
from minillm.gateway.proxy import prompt_key
from minillm.gateway.quotas import Quotas
from minillm.gateway.upstreams import Upstream


def ups(*weights: int) -> list[Upstream]:
    return [Upstream(UpstreamSpec(f"http://u{i}:80", weight=w)) for i, w in enumerate(weights)]


def test_the_gateway_imports_no_torch():
    code = "import sys, minillm.gateway, minillm.gateway.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "at least one upstream"),
        ({"upstreams": ["localhost:8000"]}, "must look like http://host:port"),
        ({"upstreams": ["http://a:1"], "strategy": "random"}, "is not one of"),
        ({"upstreams": ["http://a:1"], "routes": {"m": ["b"]}}, "unknown upstreams: b"),
        ({"upstreams": ["http://a:1"], "retrys": 2}, "unknown gateway config field(s): retrys"),
        ({"upstreams": [{"url": "http://a:1", "weigth": 2}]}, "unknown field(s) weigth"),
        ({"upstreams": ["http://a:1", "http://a:1/v1"]}, "a:1 repeats"),
        ({"upstreams": ["http://a:1"], "keys": {"sk-x": {"requests_per_minute": 0}}}, ">= 1"),
        ({"upstreams": ["http://a:1"], "health": {"interval": 0}}, "health.interval"),
    ],
)
def test_bad_config_is_named(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(config)


def test_config_aliases_and_fallback_chain():
    c = from_dict(
        {
            "upstreams": ["http://a:1/v1/"],
            "aliases": {"gpt": "big"},
            "fallbacks": {"big": ["small", "gpt", "tiny"]},
        }
    )
    assert c.upstreams[0].url == "http://a:1" and c.upstreams[0].name == "a:1"
    assert c.chain("gpt") == ["big", "small", "tiny"]  # an alias of itself is not tried twice


def test_weighted_round_robin_is_smooth_and_exact():
    pool = ups(3, 1)
    rr = RoundRobin()
    picks = [rr.choose(pool, "").name for _ in range(8)]
    assert Counter(picks) == {"u0:80": 6, "u1:80": 2}
    assert picks[:4].count("u1:80") == 1  # spread out, not u0 three times in a row then u1


def test_least_requests_prefers_the_idle_and_rotates_ties():
    a, b, c = ups(1, 1, 2)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2  # c: 2 per unit of weight 2 = 1
    lr = LeastRequests()
    assert {lr.choose([a, b, c], "").name for _ in range(4)} == {"u1:80", "u2:80"}


def test_prefix_affinity_is_stable_and_moves_only_the_lost_upstreams_keys():
    pool = ups(1, 1, 1)
    pa = PrefixAffinity()
    keys = [f"system prompt {i}" for i in range(300)]
    first = {k: pa.choose(pool, k).name for k in keys}
    assert first == {k: PrefixAffinity().choose(pool, k).name for k in keys}  # any process
    assert min(Counter(first.values()).values()) > 50  # all three get a share
    without = {k: pa.choose(pool[:2], k).name for k in keys}
    moved = [k for k in keys if first[k] != without[k]]
    assert moved and all(first[k] == "u2:80" for k in moved)


def test_prefix_affinity_bounds_the_load_of_one_hot_prefix():
    pool = ups(1, 1)
    pa = PrefixAffinity(load_factor=1.5, slack=2)
    home = pa.choose(pool, "hot")
    assert pa.choose(pool, "hot") is home  # idle: affinity holds
    home.in_flight = 3  # 3 of 3: over 1.5 x its share of 4, but within the slack of 2
    assert pa.choose(pool, "hot") is home
    home.in_flight = 12  # 12 of 12: over 1.5 x 13 / 2 + 2 = 11.75
    assert pa.choose(pool, "hot") is not home
    home.in_flight = 3  # without slack, 3 of 3 already spills
    assert PrefixAffinity(load_factor=1.5, slack=0).choose(pool, "hot") is not home


def test_prompt_key_is_the_system_prompt_or_the_leading_text():
    system = {"role": "system", "content": "You are terse."}
    a = {"messages": [system, {"role": "user", "content": "hi"}]}
    b = {"messages": [system, {"role": "user", "content": "something else"}]}
    assert prompt_key(a, 256) == prompt_key(b, 256) == "system:You are terse."
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]}
    assert prompt_key(parts, 256) == "user:abc"
    assert prompt_key({"prompt": ["long prompt", "other"]}, 4) == "long"
    assert prompt_key({"input": "embed me"}, 256) == "embed me"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_slide_and_retry_after_says_when():
    clock = Clock()
    q, key = Quotas(clock), KeyPolicy("k", requests_per_minute=2)
    assert q.admit(key) is None
    clock.t += 10
    assert q.admit(key) is None
    clock.t += 5
    refusal = q.admit(key)
    assert refusal.limit == "requests_per_minute" and refusal.retry_after == 45
    clock.t += 45  # the first request leaves the window
    assert q.admit(key) is None


def test_tokens_per_minute_charge_after_the_fact():
    clock = Clock()
    q, key = Quotas(clock), KeyPolicy("k", tokens_per_minute=100)
    assert q.admit(key) is None
    q.charge(key, 70)
    clock.t += 20
    assert q.admit(key) is None  # 70 < 100: this request may still run
    q.charge(key, 50)  # and take the key over its limit
    clock.t += 1
    refusal = q.admit(key)
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after == 39
    clock.t += 39  # the 70 leave the window: 50 < 100
    assert q.admit(key) is None
