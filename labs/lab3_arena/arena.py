"""The arena's rules, without Gradio: rounds, blind sides, votes.

A round sends one prompt to two models through the gateway. In blind mode the two models are
put on the left ("A") and right ("B") in a random order and their names are hidden until the
vote; only blind rounds can be voted on (a visible name biases the vote), each once, and only
once both answers are complete. Votes go to the Leaderboard (JSON on disk).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from labs.lab3_arena.duel import Side, stream_pair
from labs.lab3_arena.leaderboard import OUTCOMES, Leaderboard, Vote

if TYPE_CHECKING:
    import openai

MAX_ROUNDS = 1000  # rounds remembered for voting (the oldest are forgotten first)


@dataclass
class Round:
    id: str
    model_a: str  # left
    model_b: str  # right
    prompt: str
    blind: bool
    finished: bool = False
    failed: bool = False
    voted: str | None = None


def side_dict(side: Side, label: str) -> dict[str, Any]:
    return {"model": label, "text": side.text, "stats": side.stats(), "tokens": side.tokens,
            "ttft": side.ttft, "elapsed": side.elapsed, "tokens_per_s": side.tokens_per_s,
            "done": side.done,
            "error": side.error}  # fmt: skip


class Arena:
    def __init__(
        self, client: openai.OpenAI, leaderboard: Leaderboard, rng: random.Random | None = None
    ) -> None:
        self.client, self.leaderboard = client, leaderboard
        self.rng = rng or random.Random()
        self.rounds: OrderedDict[str, Round] = OrderedDict()
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return [m.id for m in self.client.models.list().data]

    def pick(self, model_1: str, model_2: str) -> tuple[str, str]:
        """The two models of a round: the ones asked for, else the gateway's first two."""
        served = [] if model_1 and model_2 else self.models()
        model_1 = model_1 or next((m for m in served if m != model_2), "")
        model_2 = model_2 or next((m for m in served if m != model_1), "")
        if not model_1 or not model_2:
            raise ValueError(f"the arena needs two models; the gateway serves {served}")
        if model_1 == model_2:
            raise ValueError(f"pick two different models (both are {model_1!r})")
        return model_1, model_2

    def duel(
        self,
        prompt: str,
        model_1: str = "",
        model_2: str = "",
        blind: bool = True,
        system_prompt: str = "",
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 128,
    ) -> Iterator[dict[str, Any]]:
        """Stream both answers; every update is a dict with the round id and both sides."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("type a prompt first")
        left, right = self.pick(model_1, model_2)
        if blind and self.rng.random() < 0.5:
            left, right = right, left
        rnd = Round(uuid.uuid4().hex[:12], left, right, prompt, bool(blind))
        with self._lock:
            self.rounds[rnd.id] = rnd
            while len(self.rounds) > MAX_ROUNDS:
                self.rounds.popitem(last=False)
        messages = [{"role": "user", "content": prompt}]
        if system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt})
        labels = ("A", "B") if rnd.blind else (left, right)
        pair = stream_pair(self.client, (left, right), messages, temperature, top_p, max_tokens)
        for a, b in pair:
            done = a.done and b.done
            if done:
                rnd.failed, rnd.finished = bool(a.error or b.error), True
            yield {"round": rnd.id, "blind": rnd.blind, "done": done,
                   "a": side_dict(a, labels[0]), "b": side_dict(b, labels[1])}  # fmt: skip

    def vote(self, round_id: str, outcome: str) -> dict[str, Any]:
        """Record a blind vote; returns the revealed names and the new leaderboard."""
        if outcome not in OUTCOMES:
            raise ValueError(f"vote with one of {', '.join(OUTCOMES)} (got {outcome!r})")
        with self._lock:
            rnd = self.rounds.get(round_id)
            if rnd is None:
                raise ValueError(f"no round {round_id!r} to vote on (start one with a prompt)")
            if not rnd.blind:
                raise ValueError("only blind rounds are voted on: a visible name biases the vote")
            if not rnd.finished:
                raise ValueError("wait until both answers are complete before voting")
            if rnd.failed:
                raise ValueError("a round where a model failed cannot be voted on")
            if rnd.voted is not None:
                raise ValueError(f"this round already has a vote ({rnd.voted})")
            rnd.voted = outcome
        rows = self.leaderboard.add(Vote(rnd.model_a, rnd.model_b, outcome, rnd.prompt))
        return {"round": rnd.id, "a": rnd.model_a, "b": rnd.model_b, "outcome": outcome,
                "leaderboard": [asdict(r) for r in rows]}  # fmt: skip
