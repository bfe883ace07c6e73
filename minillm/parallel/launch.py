"""Run minillm under torchrun: the same workers, started by torchrun on every node.

    torchrun --nnodes 2 --nproc-per-node 3 --node-rank R --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 -m minillm.parallel.launch serve smollm2 -tp 3 -pp 2

Every process runs this module with the same arguments. torchrun sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, so every rank joins one group (env://) instead of minillm opening
a store and spawning workers. Rank 0 then runs the command (`serve`: the whole server, with
its one scheduler; `generate`: one batch of prompts, printed as JSON), sending each step to the
others over the control group; every other rank loads its part of the model and runs the same
worker loop a spawned worker runs (worker.py), until rank 0 says stop or goes away.

WORLD_SIZE must equal tensor_parallel_size x pipeline_parallel_size. Ranks are laid out
pipeline-major (config.py), so with one node per stage the TP all-reduces stay inside a node.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from typing import Any

import torch.distributed as dist

from minillm.kernels import resolve_backend_name
from minillm.parallel.config import ParallelConfig
from minillm.parallel.cores import share_cores
from minillm.parallel.executor import distributed_timeout_s, use_torchrun_group
from minillm.parallel.group import (
    destroy_group,
    init_from_env,
    make_subgroups,
    process_group_backend,
)
from minillm.parallel.worker import build_model, serve_commands

COMMANDS = ("serve", "generate")


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm.parallel.launch generate")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--backend", default="auto")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(
            f"usage: torchrun ... -m minillm.parallel.launch {{{','.join(COMMANDS)}}} MODEL "
            "-tp N [-pp M] [options]"
        )
    if argv[0] == "serve":
        from minillm.cli import build_parser

        return build_parser()[0].parse_args(argv)
    args = _generate_parser().parse_args(argv[1:])
    args.command = "generate"
    return args


def run_rank0(argv: list[str], args: argparse.Namespace) -> int:
    use_torchrun_group()
    if argv[0] == "serve":
        from minillm.cli import main as cli_main

        return cli_main(argv)
    from minillm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(
        args.model,
        backend=args.backend,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    ) as llm:
        outs = llm.generate(args.prompt, params)
    rows = [{"text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids} for o in outs]
    print(json.dumps(rows), flush=True)
    return 0


def run_worker(rank: int, parallel: ParallelConfig, model: str, backend: str) -> int:
    """Load rank's part, report to rank 0 (gather), then serve its commands."""
    from minillm.loader import locate

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides what Ctrl-C means
    error: str | None = None
    ops: Any = None
    net: Any = None
    try:
        share_cores(parallel.world_size, backend)
        ops, net = build_model(locate(model), backend, rank, parallel)
    except Exception:
        error = traceback.format_exc()
    groups = make_subgroups(parallel, rank, control=True)
    dist.gather_object(error, None, dst=0, group=groups.control)
    if error is not None:
        print(error, file=sys.stderr)
        return 1
    net.tp_group = groups.tp

    def recv() -> tuple | None:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=groups.control)
        except (RuntimeError, ConnectionError):  # rank 0 is gone
            return None
        return box[0]

    serve_commands(net, ops, recv, groups.control)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    backend = resolve_backend_name(args.backend)
    parallel = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size)
    rank, world = init_from_env(distributed_timeout_s(), process_group_backend(backend))
    try:
        if world != parallel.world_size:
            raise SystemExit(
                f"torchrun started {world} processes, but --tensor-parallel-size x "
                f"--pipeline-parallel-size = {parallel.world_size}; make them equal"
            )
        if rank == 0:
            return run_rank0(argv, args)
        return run_worker(rank, parallel, args.model, backend)
    finally:
        destroy_group()


if __name__ == "__main__":
    sys.exit(main())
