"""`--disaggregation-mode` (SGLang's flag): make a server one half of a prefill/decode pair.

- "null" (the default): one server prefills and decodes, as always;
- "prefill": the server also answers a decode server's internal requests (pd_prefill.py);
- "decode": every prompt is computed on the prefill server at `--prefill-url`, whose K/V this
  server receives and decodes from (pd_decode.py).

Both halves identify their model by the SHA-256 of its files, computed once here, so a pair
that loaded different models is refused at start-up and on every request.
"""

from __future__ import annotations

from fastapi import FastAPI

from minillm.parallel.pd_transfer import model_fingerprint
from minillm.serve.engine_client import ServingEngine
from minillm.serve.pd_decode import PrefillClient
from minillm.serve.pd_prefill import router as pd_router
from minillm.serve.pd_protocol import DISAGGREGATION_MODES, PDIdentity


def install_disaggregation(
    app: FastAPI,
    serving: ServingEngine,
    mode: str,
    prefill_url: str | None,
    api_key: str | None,
) -> None:
    """Check the mode and URL, then add the prefill routes or the decode client."""
    if mode not in DISAGGREGATION_MODES:
        raise ValueError(
            f"--disaggregation-mode must be one of {', '.join(DISAGGREGATION_MODES)}, got {mode!r}"
        )
    if mode == "decode" and not prefill_url:
        raise ValueError(
            "--disaggregation-mode decode needs --prefill-url URL (the prefill server)"
        )
    if mode != "decode" and prefill_url:
        raise ValueError("--prefill-url is only for --disaggregation-mode decode")
    if mode == "null":
        return
    if getattr(serving.llm, "executor", None) is not None:
        raise ValueError(
            f"--disaggregation-mode {mode} runs on one process per server; it cannot be combined "
            "with --tensor-parallel-size or --pipeline-parallel-size > 1 yet"
        )
    identity = PDIdentity.of(
        serving.llm, serving.model_name, model_fingerprint(serving.llm.loaded.path)
    )
    if mode == "prefill":
        app.state.pd_identity = identity
        app.include_router(pd_router)
    else:
        assert prefill_url is not None
        serving.prefill_client = PrefillClient(prefill_url, identity, serving.metrics, api_key)
