"""The decode server's side of a PD pair (`minillm serve MODEL --disaggregation-mode decode
--prefill-url URL`).

Clients talk to the decode server's usual OpenAI and Ollama APIs. For each request it asks the
prefill server (serve/pd_prefill.py) to compute the prompt and its first token, receives the
prompt's K/V (parallel/pd_transfer.py), and hands both to its engine
(AsyncLLMEngine.generate_prefilled), which writes the K/V into its own paged cache and decodes
on. Answers equal one colocated server's: the prefill side samples the first token with the
request's own parameters and seed, and the generator's state travels with the K/V.

The transfer runs on a thread of its own (a blocking HTTP client), never on the event loop:
only a finished PrefilledPrompt comes back to it. Nothing is allocated in this server's cache
until the whole K/V has arrived, so a prefill server that is down, refuses, serves another
model or cuts the stream leaves no blocks behind; the client gets a 502 or 503 that says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import httpx

from minillm.engine.async_engine import AsyncLLMEngine
from minillm.engine.outputs import RequestOutput
from minillm.engine.prefilled import PrefilledPrompt
from minillm.parallel.pd_transfer import (
    TransferCancelled,
    TransferCut,
    TransferError,
    read_prefilled,
)
from minillm.sampling import SamplingParams
from minillm.serve.errors import APIError
from minillm.serve.metrics import ServerMetrics
from minillm.serve.pd_protocol import PD_HEADER, PD_HEADER_VALUE, PDIdentity

CONNECT_TIMEOUT_S = 10.0
PREFILL_TIMEOUT_S = 600.0  # a long prompt on a busy CPU prefill server takes a while
TRANSFER_THREADS = 16


class PrefillPairError(ValueError):
    """The prefill server at --prefill-url cannot pair with this server (a start-up check)."""


class PrefillClient:
    """Talks to one prefill server: the start-up check, then one K/V transfer per request."""

    def __init__(
        self,
        url: str,
        identity: PDIdentity,
        metrics: ServerMetrics,
        api_key: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--prefill-url must be an http:// or https:// URL, got {url!r}")
        self.url, self.identity, self.metrics = url.rstrip("/"), identity, metrics
        headers = {PD_HEADER: PD_HEADER_VALUE}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(PREFILL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=TRANSFER_THREADS),
        )
        self._threads = ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="minillm-pd")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ------------------------------------------------------------------ start-up check
    def check_pair(self) -> str | None:
        """None when the prefill server answers and serves the same model; a warning when it
        cannot be reached (requests will get 503 until it can). Raises PrefillPairError when it
        answers but cannot pair: another model, not a prefill server, or a refused key."""
        try:
            r = self._http.get(f"{self.url}/internal/pd/info", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as e:
            return f"the prefill server at {self.url} is not reachable yet ({e})"
        if r.status_code != 200:
            raise PrefillPairError(self._refusal(r.status_code, r.content).message)
        theirs = r.json()
        mine = self.identity.as_json()
        if theirs.get("fingerprint") != mine["fingerprint"]:
            raise PrefillPairError(
                f"the prefill server at {self.url} serves {theirs.get('model')!r} (model sha256 "
                f"{str(theirs.get('fingerprint'))[:12]}…), this server {mine['model']!r} (sha256 "
                f"{mine['fingerprint'][:12]}…): both servers of a pair must load the same model"
            )
        return None

    # ------------------------------------------------------------------ per request
    async def generate(
        self,
        engine: AsyncLLMEngine,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        """Prefill remotely, then decode here; the outputs `AsyncLLMEngine.generate` gives."""
        arrival = time.perf_counter()
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            self._threads, self.fetch, prompt_ids, params, request_id, cancelled
        )
        try:
            pre = await job
        except asyncio.CancelledError:  # the client left: the thread stops at its next chunk
            cancelled.set()
            raise
        outs = engine.generate_prefilled(prompt_ids, params, pre, request_id, arrival)
        async with contextlib.aclosing(outs):
            async for out in outs:
                yield out

    def fetch(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cancelled: threading.Event | None = None,
    ) -> PrefilledPrompt:
        """One prompt through the prefill server (blocking: runs on a transfer thread)."""
        sampling = {
            f.name: getattr(params, f.name)
            for f in dataclasses.fields(params)
            if f.name != "output_kind"
        }
        body = {
            "prompt_token_ids": prompt_ids,
            "sampling": sampling,
            "fingerprint": self.identity.fingerprint,
            "request_id": request_id,
        }
        where = f"the prefill server at {self.url}"
        try:
            with self._http.stream("POST", f"{self.url}/internal/pd/prefill", json=body) as r:
                if r.status_code != 200:
                    raise self._refusal(r.status_code, r.read())
                t0 = time.perf_counter()
                pre = read_prefilled(r.iter_raw(), self.identity.layout, len(prompt_ids), cancelled)
                seconds = time.perf_counter() - t0
        except TransferCancelled:
            raise APIError(499, "the client closed the request") from None
        except TransferCut as e:
            raise APIError(502, f"the K/V transfer from {where} was cut midway: {e}") from e
        except TransferError as e:
            raise APIError(502, f"{where} sent K/V this server cannot use: {e}") from e
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise APIError(
                503,
                f"{where} is unreachable ({e}); start it with `minillm serve MODEL "
                "--disaggregation-mode prefill` or fix --prefill-url",
            ) from e
        except httpx.TimeoutException as e:
            raise APIError(502, f"{where} did not answer in time ({e!r})") from e
        except httpx.HTTPError as e:  # a reset or a protocol error midway
            raise APIError(502, f"the K/V transfer from {where} was cut midway ({e!r})") from e
        self.metrics.observe_kv_transfer(pre.nbytes, seconds)
        return pre

    def _refusal(self, status: int, content: bytes) -> APIError:
        """The prefill server's error, said as this server's: who refused, and why."""
        try:
            message = json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = content[:200].decode("utf-8", "replace") or f"HTTP {status}"
        where = f"the prefill server at {self.url}"
        if status == 404:
            return APIError(
                502,
                f"{self.url} is not a prefill server ({message}); start it with "
                "`minillm serve MODEL --disaggregation-mode prefill`",
            )
        if status == 401:
            return APIError(
                502, f"{where} refused this server's API key; a pair shares one --api-key"
            )
        if status == 400:  # the prompt or parameters themselves
            return APIError(400, f"{where} refused the request: {message}")
        if status == 503:
            return APIError(503, f"{where} is busy or not ready: {message}")
        return APIError(502, f"{where} refused the request (HTTP {status}): {message}")
