"""The arena's leaderboard: votes kept in a JSON file, rated two ways.

- **Elo** (online): after each vote, R_a += K * (S_a - E_a) with E_a = 1 / (1 + 10^((R_b-R_a)/400)),
  S_a = 1 for a win, 0.5 for a tie (and for "both bad"), 0 for a loss; every model starts at
  INITIAL. K = 32 moves a rating visibly after one vote (chess uses 10-40; LMSYS's online Elo
  used 4 over many thousands of votes). Elo depends on the order of the votes.
- **Bradley–Terry** (batch): P(i beats j) = p_i / (p_i + p_j), p fitted by maximum likelihood
  over all votes at once with Hunter's MM iterations (p_i <- W_i / sum_j n_ij / (p_i + p_j)),
  so the order of the votes does not matter. Ties count as half a win for each side, and
  every pair of models gets PRIOR_TIES virtual ties, so a model with no win yet still has a
  finite rating (a plain MLE would send it to minus infinity). Shown on the Elo scale:
  INITIAL + 400 log10(p_i), with the geometric mean of p at 1.

Pure Python (no Gradio), so tests and the notebook check the maths directly.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

INITIAL = 1000.0
K = 32.0
PRIOR_TIES = 1.0
# What a voter can say about a (left=A, right=B) pair, and the score A gets from it.
OUTCOMES = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass(frozen=True)
class Vote:
    """One blind vote: `model_a` was shown on the left as "A", `model_b` on the right."""

    model_a: str
    model_b: str
    outcome: str  # one of OUTCOMES
    prompt: str = ""
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"vote outcome {self.outcome!r} is not one of {', '.join(OUTCOMES)}")
        if not self.model_a or not self.model_b or self.model_a == self.model_b:
            raise ValueError("a vote compares two different, named models")

    @property
    def score_a(self) -> float:
        return OUTCOMES[self.outcome]


def elo(votes: list[Vote], k: float = K, initial: float = INITIAL) -> dict[str, float]:
    """Replay the votes in order; each one moves both ratings by the same amount."""
    ratings: dict[str, float] = {}
    for v in votes:
        ra, rb = ratings.get(v.model_a, initial), ratings.get(v.model_b, initial)
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))
        delta = k * (v.score_a - expected_a)
        ratings[v.model_a], ratings[v.model_b] = ra + delta, rb - delta
    return ratings


def bradley_terry(
    votes: list[Vote],
    prior_ties: float = PRIOR_TIES,
    iterations: int = 10_000,
    tol: float = 1e-10,
    initial: float = INITIAL,
) -> dict[str, float]:
    """Bradley–Terry strengths by MM iterations, on the Elo scale (see the module docstring)."""
    models = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    if len(models) < 2:
        return {m: initial for m in models}
    wins = {m: 0.0 for m in models}  # W_i, ties as halves
    games: dict[tuple[str, str], float] = {}  # n_ij, symmetric
    for v in votes:
        wins[v.model_a] += v.score_a
        wins[v.model_b] += 1.0 - v.score_a
        for pair in ((v.model_a, v.model_b), (v.model_b, v.model_a)):
            games[pair] = games.get(pair, 0.0) + 1.0
    for i in models:
        for j in models:
            if i != j:
                games[(i, j)] = games.get((i, j), 0.0) + prior_ties
        wins[i] += 0.5 * prior_ties * (len(models) - 1)
    if any(w <= 0 for w in wins.values()):
        raise ValueError("a model with no win and no tie has no finite Bradley–Terry rating")
    p = {m: 1.0 for m in models}
    for _ in range(iterations):
        new = {
            i: wins[i] / sum(games[(i, j)] / (p[i] + p[j]) for j in models if j != i)
            for i in models
        }
        scale = math.exp(sum(math.log(x) for x in new.values()) / len(models))
        new = {m: x / scale for m, x in new.items()}
        change = max(abs(math.log(new[m] / p[m])) for m in models)
        p = new
        if change < tol:
            break
    return {m: initial + 400.0 * math.log10(x) for m, x in p.items()}


@dataclass(frozen=True)
class Row:
    model: str
    elo: float
    bradley_terry: float
    games: int
    wins: int
    losses: int
    ties: int


def table(votes: list[Vote], k: float = K) -> list[Row]:
    """One row per model, best Bradley–Terry rating first."""
    e, bt = elo(votes, k), bradley_terry(votes)
    counts: dict[str, list[int]] = {m: [0, 0, 0, 0] for m in e}  # games, wins, losses, ties
    for v in votes:
        for model, score in ((v.model_a, v.score_a), (v.model_b, 1.0 - v.score_a)):
            c = counts[model]
            c[0] += 1
            c[1 if score == 1.0 else 2 if score == 0.0 else 3] += 1
    rows = [Row(m, e[m], bt[m], *counts[m]) for m in e]
    return sorted(rows, key=lambda r: (-r.bradley_terry, r.model))


class Leaderboard:
    """Votes in a JSON file: read on start, rewritten (atomically) after every vote."""

    def __init__(self, path: str | Path, k: float = K) -> None:
        self.path, self.k = Path(path), k
        self._lock = threading.Lock()
        self.votes: list[Vote] = self._load()

    def _load(self) -> list[Vote]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [Vote(**v) for v in data["votes"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not an arena votes file: {e}") from None

    def add(self, vote: Vote) -> list[Row]:
        with self._lock:
            self.votes.append(vote)
            self._save()
            return table(self.votes, self.k)

    def rows(self) -> list[Row]:
        with self._lock:
            return table(self.votes, self.k)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"k": self.k, "initial": INITIAL, "votes": [asdict(v) for v in self.votes]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.path)  # a crash mid-write never leaves half a file
