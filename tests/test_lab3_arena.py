"""Lab 3 (the arena): the rating maths by hand, then the app on two real upstreams.

1. Elo and Bradley–Terry against values computed by hand (and, for Bradley–Terry on three
   models, against the maximum-likelihood conditions themselves); the votes file round-trips.
2. Two `minillm` servers (tiny random models, one of them quantized to Q8_0 by
   `minillm quantize`) behind a real `minillm gateway`, the arena launched on top and driven
   through `gradio_client`: `/duel` streams both answers at once, each equal to its own model's
   greedy answer; a blind `/vote` reveals the names, updates the Elo and writes the JSON file,
   which a restarted arena reads back.
3. Headless chromium renders both answers side by side and reveals the names after a vote.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest

from labs.lab3_arena.app import build_demo
from labs.lab3_arena.leaderboard import Leaderboard, Vote, bradley_terry, elo, table
from minillm import LLM, SamplingParams
from minillm.gateway import from_dict
from minillm.gateway import start_in_thread as start_gateway
from minillm.serve import build_app, start_in_thread
from minillm.testing import make_tiny_model, slowed_steps

STATS = re.compile(r"\*(?P<tokens>\d+) tokens? · [0-9.]+ tokens/s · TTFT [0-9.]+ s.*\*")
MAX_TOKENS = 8
PROMPT = "Tell me about KV caches."


# ---- 1. the maths ------------------------------------------------------------------------------


def test_elo_by_hand():
    # Equal ratings: expected score 0.5, so a win moves K * 0.5 = 16 points each way.
    assert elo([Vote("x", "y", "A")]) == {"x": 1016.0, "y": 984.0}
    # Then y wins: E_y = 1 / (1 + 10^(32/400)) = 0.454059, y gains 32 * 0.545941 = 17.4701.
    r = elo([Vote("x", "y", "A"), Vote("y", "x", "A")])
    assert r["y"] == pytest.approx(1001.4701, abs=1e-3)
    assert r["x"] == pytest.approx(998.5299, abs=1e-3)
    # A tie between unequal ratings pulls them together; "both bad" scores as a tie.
    r = elo([Vote("x", "y", "A"), Vote("x", "y", "both_bad")])
    assert r["x"] == pytest.approx(1016 + 32 * (0.5 - 0.545941), abs=1e-3)
    assert elo([Vote("x", "y", "tie")]) == {"x": 1000.0, "y": 1000.0}
    assert elo([Vote("x", "y", "B")], k=4) == {"x": 998.0, "y": 1002.0}
    with pytest.raises(ValueError, match="outcome 'left'"):
        Vote("x", "y", "left")
    with pytest.raises(ValueError, match="two different"):
        Vote("x", "x", "A")


def test_bradley_terry_by_hand():
    # Two models: the MLE has p_x / p_y = W_x / W_y. x won 3, y won 1, plus one virtual tie
    # (half a win each): 3.5 / 1.5, so x - y = 400 log10(7/3) = 147.19, centred on 1000.
    votes = [Vote("x", "y", "A"), Vote("y", "x", "B"), Vote("x", "y", "A"), Vote("x", "y", "B")]
    bt = bradley_terry(votes)
    assert bt["x"] == pytest.approx(1073.595, abs=1e-2)
    assert bt["y"] == pytest.approx(926.405, abs=1e-2)
    # Order does not matter for Bradley–Terry (it does for Elo).
    assert bradley_terry(votes[::-1]) == pytest.approx(bt)
    assert elo(votes[::-1]) != pytest.approx(elo(votes))
    # No virtual ties and y never won: no finite MLE, said plainly.
    with pytest.raises(ValueError, match="no finite"):
        bradley_terry([Vote("x", "y", "A")], prior_ties=0)


def test_bradley_terry_solves_the_likelihood_equations():
    """At the MLE, each model's expected wins equal its wins: W_i = sum_j n_ij p_i/(p_i+p_j);
    and the log-likelihood is lower anywhere nearby."""
    outcomes = ["A", "A", "B", "tie", "A", "both_bad", "B", "A", "A", "B"]
    pairs = [("x", "y"), ("y", "z"), ("x", "z"), ("z", "y"), ("y", "x")]
    votes = [Vote(*pairs[i % len(pairs)], o) for i, o in enumerate(outcomes)]
    bt = bradley_terry(votes, prior_ties=0.5)
    p = {m: 10 ** ((r - 1000) / 400) for m, r in bt.items()}
    assert math.prod(p.values()) == pytest.approx(1.0)  # geometric mean 1 <=> mean rating 1000
    models = sorted(p)
    wins = {m: 0.5 * 0.5 * 2 for m in models}  # the virtual ties: half a win per pair
    games = {(i, j): 0.5 for i in models for j in models if i != j}
    for v in votes:
        wins[v.model_a] += v.score_a
        wins[v.model_b] += 1 - v.score_a
        games[(v.model_a, v.model_b)] += 1
        games[(v.model_b, v.model_a)] += 1

    def loglik(q: dict[str, float]) -> float:
        return sum(wins[i] * math.log(q[i]) for i in models) - sum(
            games[(i, j)] * math.log(q[i] + q[j]) for i in models for j in models if i < j
        )

    for i in models:
        expected = sum(games[(i, j)] * p[i] / (p[i] + p[j]) for j in models if j != i)
        assert expected == pytest.approx(wins[i], abs=1e-6)
        for step in (1.01, 0.99):
            assert loglik({**p, i: p[i] * step}) < loglik(p)


def test_votes_file_round_trips(tmp_path):
    path = tmp_path / "votes.json"
    board = Leaderboard(path)
    board.add(Vote("x", "y", "A", prompt="hi"))
    rows = board.add(Vote("y", "x", "tie"))
    data = json.loads(path.read_text())
    assert [v["outcome"] for v in data["votes"]] == ["A", "tie"] and data["k"] == 32
    again = Leaderboard(path)
    assert again.rows() == rows == table(again.votes)
    assert (rows[0].model, rows[0].wins, rows[0].ties, rows[0].games) == ("x", 1, 1, 2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not an arena votes file"):
        Leaderboard(path)


# ---- 2. the app on two upstreams behind a gateway -------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Two different tiny models: one as trained (F32), one quantized to Q8_0 by the CLI."""
    root = tmp_path_factory.mktemp("arena")
    first = make_tiny_model(root / "first", "llama", seed=31)
    second = make_tiny_model(root / "second", "llama", seed=32)
    q8 = root / "second-q8_0.gguf"
    subprocess.run(
        [sys.executable, "-m", "minillm.cli", "quantize", str(second), "--to", "q8_0", "-o",
         str(q8)], check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return {"tiny-f32": str(first), "tiny-q8_0": str(q8)}


def load(path: str) -> LLM:
    return LLM(path, backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def gateway(models, free_port):
    """Each model on its own minillm server (steps slowed a little, so both streams certainly
    overlap in time), and one gateway in front of both."""
    llms = {name: load(path) for name, path in models.items()}
    servers = [
        start_in_thread(build_app(llm, served_model_name=name), port=free_port())
        for name, llm in llms.items()
    ]
    slow = [slowed_steps(llm.engine, 0.03) for llm in llms.values()]
    for s in slow:
        s.__enter__()
    gw = start_gateway(from_dict({"upstreams": [s.url for s in servers]}), port=free_port())
    try:
        yield gw
    finally:
        gw.stop()
        for s in slow:
            s.__exit__(None, None, None)
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def references(models) -> dict[str, tuple[str, int]]:
    """Each model's own greedy answer to PROMPT and its token count, from the batch engine."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    messages = [{"role": "user", "content": PROMPT}]
    outs = {n: load(p).chat(messages, params)[0].outputs[0] for n, p in models.items()}
    return {n: (o.text, len(o.token_ids)) for n, o in outs.items()}


def launch(gateway_url: str, votes, free_port):
    demo = build_demo(gateway_url, votes_path=votes, seed=0)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
    )
    return demo, url


@pytest.fixture
def app_url(gateway, free_port, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    demo, url = launch(gateway.url, tmp_path / "votes.json", free_port)
    yield url
    demo.close()


def test_duel_streams_two_models_and_a_blind_vote_is_saved(
    gateway, app_url, references, tmp_path, free_port
):
    from gradio_client import Client

    assert references["tiny-f32"] != references["tiny-q8_0"]  # the sides can be told apart
    client = Client(app_url, verbose=False)
    job = client.submit(PROMPT, "tiny-f32", "tiny-q8_0", True, "", 0.0, 1.0, MAX_TOKENS,
                        api_name="/duel")  # fmt: skip
    updates = list(job)
    final = updates[-1]
    assert final["done"] and final["blind"] and len({u["round"] for u in updates}) == 1
    a, b = final["a"], final["b"]
    assert (a["model"], b["model"]) == ("A", "B")  # names hidden until the vote
    # Each update extends the last. How many of them gradio_client sees depends on the machine's
    # load (its queue may merge updates), so their number is not asserted; that the two sides
    # stream at once is checked below from their own timings.
    texts = [u["a"]["text"] for u in updates]
    assert all(y.startswith(x) for x, y in zip(texts, texts[1:], strict=False))
    for side in (a, b):
        match = STATS.fullmatch(side["stats"])
        assert match and int(match["tokens"]) == side["tokens"], side
    # Both streamed at once: each one's first token came before the other had finished.
    assert a["ttft"] < b["elapsed"] and b["ttft"] < a["elapsed"]

    with pytest.raises(Exception, match="outcome|vote with one of"):
        client.predict(final["round"], "left", api_name="/vote")
    result = client.predict(final["round"], "A", api_name="/vote")
    assert {result["a"], result["b"]} == {"tiny-f32", "tiny-q8_0"}
    assert (a["text"], a["tokens"]) == references[result["a"]]
    assert (b["text"], b["tokens"]) == references[result["b"]]
    ratings = {r["model"]: r["elo"] for r in result["leaderboard"]}
    assert ratings == {result["a"]: 1016.0, result["b"]: 984.0}
    saved = json.loads((tmp_path / "votes.json").read_text())["votes"]
    assert [(v["model_a"], v["model_b"], v["outcome"], v["prompt"]) for v in saved] == [
        (result["a"], result["b"], "A", PROMPT)
    ]
    with pytest.raises(Exception, match="already has a vote"):
        client.predict(final["round"], "B", api_name="/vote")
    with pytest.raises(Exception, match="no round"):
        client.predict("nope", "A", api_name="/vote")

    *_, named = client.submit(PROMPT, "tiny-f32", "tiny-q8_0", False, "", 0.0, 1.0, 2,
                              api_name="/duel")  # fmt: skip
    assert (named["a"]["model"], named["b"]["model"]) == ("tiny-f32", "tiny-q8_0")
    with pytest.raises(Exception, match="only blind rounds"):
        client.predict(named["round"], "A", api_name="/vote")
    with pytest.raises(Exception, match="two different"):
        client.predict(PROMPT, "tiny-f32", "tiny-f32", True, "", 0.0, 1.0, 2, api_name="/duel")

    # A restarted arena reads the votes back.
    demo, url = launch(gateway.url, tmp_path / "votes.json", free_port)
    try:
        again = Client(url, verbose=False).predict(api_name="/leaderboard")
    finally:
        demo.close()
    assert again == result["leaderboard"]


def test_a_failing_side_is_shown_and_cannot_be_voted_on(app_url, references):
    """A model the gateway does not serve fails on its own side, with the gateway's reason;
    the other side still answers; the round cannot be voted on."""
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    *_, final = client.submit(PROMPT, "tiny-f32", "nope", False, "", 0.0, 1.0, MAX_TOKENS,
                              api_name="/duel")  # fmt: skip
    assert final["done"] and final["a"]["text"] == references["tiny-f32"][0]
    assert re.search(r"404.*'nope' is not served here", final["b"]["error"])
    assert final["b"]["stats"].startswith("**error:**")
    *_, blind = client.submit(PROMPT, "nope", "tiny-f32", True, "", 0.0, 1.0, 2,
                              api_name="/duel")  # fmt: skip
    with pytest.raises(Exception, match="a model failed"):
        client.predict(blind["round"], "tie", api_name="/vote")
    with pytest.raises(Exception, match="type a prompt"):
        client.predict("  ", api_name="/duel")


# ---- 3. a real browser -------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_shows_both_answers_and_reveals_after_a_vote(
    app_url, references, chromium_path, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(chromium_path),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync",
                  "--no-proxy-server"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(app_url)
            expect(page.locator("#model-1 input")).to_have_value("tiny-f32", timeout=60_000)
            page.get_by_text("Generation settings").click()
            for elem_id, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
                field = page.locator(f"#{elem_id} input[type=number]")
                field.fill(value)
                field.press("Enter")
                field.press("Tab")  # blur: the number is committed to the app's state
                expect(field).to_have_value(value)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#send").click()
            for side in ("a", "b"):
                expect(page.locator(f"#stats-{side}")).to_contain_text("tokens/s", timeout=90_000)
            want = [" ".join(t.split()) for t, _ in references.values()]
            shown = [wait_for_answer(page, f"#chat-{s} .message.bot", want) for s in ("a", "b")]
            assert sorted(shown) == sorted(want)
            page.screenshot(path=str(tmp_path / "lab3_arena_answers.png"), full_page=True)
            page.locator("#vote-A").click()
            expect(page.locator("#note")).to_contain_text("A was", timeout=60_000)
            note = page.locator("#note").inner_text()
            left = "tiny-f32" if shown[0] == want[0] else "tiny-q8_0"
            assert f"A was {left}" in " ".join(note.split())
            expect(page.locator("#vote-B")).to_be_disabled()
        finally:
            browser.close()
    assert (tmp_path / "lab3_arena_answers.png").stat().st_size > 10_000


def wait_for_answer(page, selector: str, candidates: list[str], seconds: float = 60.0) -> str:
    """The last bot message under `selector` (whitespace normalised) once it equals one of
    `candidates`; what it shows at the deadline otherwise (the caller's assert says why)."""
    deadline = time.monotonic() + seconds
    while True:
        shown = " ".join(page.locator(selector).last.inner_text().split())
        if shown in candidates or time.monotonic() > deadline:
            return shown
        time.sleep(0.1)
