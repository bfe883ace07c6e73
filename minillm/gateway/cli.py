"""`minillm gateway --port P --upstream URL [--upstream URL ...] [--strategy S] [--api-key K ...]
[--config FILE]`: the gateway from the command line (flags on top of the YAML file)."""

from __future__ import annotations

import argparse

from minillm.gateway.config import STRATEGIES


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `gateway` subcommand to minillm's CLI."""
    p = subparsers.add_parser(
        "gateway",
        help="one OpenAI-compatible entry point in front of many servers (balancing, failover, "
        "quotas)",
    )
    p.add_argument(
        "--upstream",
        action="append",
        metavar="URL",
        help="an OpenAI-compatible server, e.g. http://127.0.0.1:8001 (repeat for more)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="how to pick an upstream (default round-robin, or the config file's)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="a key clients must send as `Authorization: Bearer KEY` (repeat for more; quotas "
        "per key go in the config file)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML: routes, weights, aliases, fallbacks, keys"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_gateway)
    return p


def cmd_gateway(args: argparse.Namespace) -> int:
    from minillm.gateway.app import serve
    from minillm.gateway.config import from_args

    config = from_args(args)
    base = f"http://{args.host}:{args.port}"
    ups = ", ".join(f"{u.name} ({u.url})" for u in config.upstreams)
    print(f"gateway at {base}/v1 -> {ups}; strategy {config.strategy}", flush=True)
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
