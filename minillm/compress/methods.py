"""Names of the quantization methods, importable without torch (the CLI builds its parser
from them before any model code is loaded)."""

from __future__ import annotations

# `minillm quantize --to ...`: each one writes a GGUF file
CLI_METHODS = ("q8_0", "q5_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8", "int4", "awq-int4")
# in memory only (no GGUF layout): group-wise int4 with other group sizes, for comparisons
EXPERIMENT_METHODS = ("int4-g64", "int4-g128", "awq-int4-g128")
