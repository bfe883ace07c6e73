"""`minillm quantize MODEL --to FORMAT -o out.gguf`: like llama.cpp's llama-quantize.

Block formats (q8_0, q5_0, q4_0, q4_1, q4_k, q6_k) map directly onto GGUF types; `int4` is group-32
asymmetric int4, which is exactly Q4_1's layout; `awq-int4` runs AWQ's activation-aware scale
search on calibration text first, then stores Q4_1; `int8` is per-channel int8, stored as GGUF
I8 tensors plus an F32 row-scale tensor each (minillm reads it; llama.cpp does not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minillm.compress.methods import CLI_METHODS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `quantize` subcommand to minillm's CLI."""
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model's linear layers and write a GGUF (q8_0, q4_k, awq-int4...)",
    )
    p.add_argument("model", help="smollm2, a .gguf file or a Hugging Face folder")
    p.add_argument("--to", required=True, choices=CLI_METHODS, help="target format / method")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=512,
        help="tokens of calibration text for awq-int4 (default 512)",
    )
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from minillm.compress.calibration import calibration_ids
    from minillm.compress.export import save_quantized_gguf, source_metadata
    from minillm.compress.quantize import quantize_model
    from minillm.loader import locate, read_model_files

    out = Path(args.output)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it")
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"the output must be a .gguf file, got {out}")
    t0 = time.perf_counter()
    path = locate(args.model)
    config, weights, tokenizer = read_model_files(path)
    calibration = None
    if args.to.startswith("awq"):
        calibration = calibration_ids(tokenizer, args.calibration_tokens)
    qm = quantize_model(config, weights, args.to, calibration)
    save_quantized_gguf(qm, out, source_metadata(path, config, tokenizer))
    size = out.stat().st_size
    print(
        f"{path.name} -> {out} ({args.to}): {size / 1e6:.1f} MB, linear layers "
        f"{qm.linear_bits_per_weight:.2f} bits/weight, {time.perf_counter() - t0:.1f} s",
        file=sys.stdout,
    )
    return 0
