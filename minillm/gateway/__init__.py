"""`minillm gateway`: one OpenAI-compatible entry point in front of many upstreams.

Routing by model (aliases, fallbacks), balancing (round robin, least requests, prefix
affinity), health (active checks, passive ejection), retries before the first byte, SSE
pass-through, API keys with per-minute quotas, and /metrics. It loads no model and imports
no torch: it runs in front of `minillm serve`, vLLM, llama.cpp's server or Ollama alike.

    from minillm.gateway import from_dict, run_in_thread
    with run_in_thread(from_dict({"upstreams": ["http://127.0.0.1:8001"]}), port=9000) as gw:
        ...
"""

from __future__ import annotations

from minillm.gateway.app import GatewayServer, create_app, run_in_thread, serve, start_in_thread
from minillm.gateway.config import (
    GatewayConfig,
    HealthPolicy,
    KeyPolicy,
    UpstreamSpec,
    from_dict,
    load_config,
)

__all__ = [
    "GatewayConfig",
    "GatewayServer",
    "HealthPolicy",
    "KeyPolicy",
    "UpstreamSpec",
    "create_app",
    "from_dict",
    "load_config",
    "run_in_thread",
    "serve",
    "start_in_thread",
]
