"""What a web page can make a local server do, and what the server says about where it lives.

With no API key (the default) the server on 127.0.0.1 is reachable from every page the user's
browser opens. Pages from foreign origins, and pages that re-point their own name at 127.0.0.1
(DNS rebinding), get a 403; a page can only send JSON (415 otherwise), which needs a CORS
preflight that only allowed origins pass. Scripts (curl -d, SDKs) send no Origin and are
unaffected. No reply names an absolute path on the server's disk.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from minillm import LLM
from minillm.hub.modelfile import parse_modelfile
from minillm.serve import build_app, run_in_thread
from minillm.serve.browser_guard import BrowserGuardMiddleware, OriginPolicy
from minillm.testing import make_tiny_model

MSGS = [{"role": "user", "content": "hello"}]
GENERATE = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=17)


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def server(llm, free_port):
    app = build_app(llm, served_model_name="tiny", allowed_origins=["https://chat.example"])
    with run_in_thread(app, port=free_port()) as srv:
        yield srv


def generated_tokens(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:generation_tokens_total in /metrics")


# ---------------------------------------------------------------------------- origins
def test_a_cross_site_text_plain_post_runs_nothing(server):
    """The attack of the report: a page's form/fetch POST, no preflight needed."""
    before = generated_tokens(server.url)
    r = httpx.post(
        server.url + "/api/generate",
        content=json.dumps(GENERATE),
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert r.status_code == 403 and "'https://evil.example' is not allowed" in r.json()["error"]
    assert "access-control-allow-origin" not in r.headers
    assert generated_tokens(server.url) == before


def test_curl_d_still_works_but_a_page_cannot_send_a_form(server):
    form = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    ok = httpx.post(server.url + "/api/generate", content=json.dumps(GENERATE), headers=form)
    assert ok.status_code == 200 and ok.json()["done"] is True
    page = {**form, "origin": f"{server.url}"}  # even the server's own origin
    r = httpx.post(server.url + "/api/generate", content=json.dumps(GENERATE), headers=page)
    assert r.status_code == 415 and "from a browser" in r.json()["error"]
    multipart = {"content-type": "multipart/form-data; boundary=x"}
    r = httpx.post(server.url + "/api/generate", content=b"--x--", headers=multipart)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]  # read as JSON


@pytest.mark.parametrize(
    "origin", ["http://localhost:3000", "http://127.0.0.1:5173", "https://chat.example"]
)
def test_allowed_origins_may_call_and_read_replies(server, origin):
    pre = httpx.options(
        server.url + "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MSGS, "max_tokens": 2},
        headers={"origin": origin},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin


def test_a_foreign_preflight_is_refused(server):
    pre = httpx.options(
        server.url + "/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "192.168.1.10"])
def test_dns_rebinding_is_refused_by_host(server, host):
    """A rebound page is same-origin for the browser, so its GETs carry no Origin at all."""
    r = httpx.get(server.url + "/v1/models", headers={"host": host})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "app.localhost", "[::1]:1234"])
def test_loopback_host_names_are_fine(server, host):
    assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200


def test_minillm_origins_adds_to_the_list_and_names_hosts(llm, free_port, monkeypatch):
    monkeypatch.setenv("MINILLM_ORIGINS", "https://*.corp.example, mybox.lan")
    with run_in_thread(build_app(llm, served_model_name="tiny"), port=free_port()) as srv:
        body = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
        url = srv.url + "/v1/chat/completions"
        for origin, status in (
            ("https://wiki.corp.example", 200),
            ("http://mybox.lan:8080", 200),
            ("https://corp.example.evil", 403),
        ):
            assert httpx.post(url, json=body, headers={"origin": origin}).status_code == status
        assert httpx.get(srv.url + "/health", headers={"host": "mybox.lan:80"}).status_code == 200


def test_a_server_reached_over_the_network_accepts_its_network_names():
    """Over a LAN address the Host is whatever name the LAN uses (the key protects there);
    over loopback it must be a loopback name."""

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = BrowserGuardMiddleware(ok, OriginPolicy(read_env=False))

    async def status(base_url: str, host: str) -> int:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return (await client.get("/health", headers={"host": host})).status_code

    assert asyncio.run(status("http://192.168.1.5:8000", "mybox.lan:8000")) == 200
    assert asyncio.run(status("http://127.0.0.1:8000", "mybox.lan:8000")) == 403


# ---------------------------------------------------------------------------- paths
def test_no_reply_names_the_models_path(server, tiny_dir):
    replies = [
        httpx.get(server.url + "/v1/models"),
        httpx.get(server.url + "/api/tags"),
        httpx.get(server.url + "/api/ps"),
        httpx.post(server.url + "/api/show", json={"model": "tiny"}),
        httpx.get(server.url + "/openapi.json"),
    ]
    for r in replies:
        assert r.status_code == 200 and str(tiny_dir) not in r.text, r.url
    card = replies[0].json()["data"][0]
    assert card["root"] == card["id"] == "tiny"
    assert replies[3].json()["modelfile"] == "FROM tiny\n"


def test_a_modelfile_from_an_absolute_path_is_shown_by_name(llm, tiny_dir, free_port):
    spec = parse_modelfile(f"FROM {tiny_dir}\nSYSTEM Be brief.\nPARAMETER temperature 0\n")
    app = build_app(llm, profile=spec)  # no served name: the model as loaded, i.e. a path
    with run_in_thread(app, port=free_port()) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [tiny_dir.name]
        show = httpx.post(srv.url + "/api/show", json={"model": tiny_dir.name})
        by_path = httpx.post(  # the path still works as a name, it just is not shown
            srv.url + "/v1/chat/completions",
            json={"model": str(tiny_dir), "messages": MSGS, "max_tokens": 2},
        )
    assert str(tiny_dir) not in show.text
    body = show.json()
    assert re.match(rf"FROM {tiny_dir.name}\nSYSTEM", body["modelfile"])
    assert body["details"]["parent_model"] == tiny_dir.name
    assert by_path.status_code == 200 and by_path.json()["model"] == tiny_dir.name
