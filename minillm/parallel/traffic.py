"""Bytes handed to collectives and point-to-point sends, counted per kind in this process.

Benchmarks and lesson 14 compare these counts with the formulas (TP: two all-reduces of
S x d x 4 bytes per layer; PP: S x d x 4 bytes per stage boundary; EP: the all-to-all's
dispatched and combined tokens; CP: the K/V blocks passed around the ring). Every parallel
part records here, right where it calls torch.distributed, so one counter sees them all.

What is counted is the *payload*: the size of the tensor this rank hands to the call (for an
all-reduce, the tensor being reduced; for a send, the tensor sent). What actually crosses the
wire depends on the algorithm (a ring all-reduce moves 2(N-1)/N of the payload per rank);
`ring_all_reduce_wire_bytes` gives that factor so readers apply it explicitly.

The counters are per process: rank 0 counts rank 0's traffic. Executors can ask their workers
for theirs (`traffic_snapshots()` on the TP/PP executor). Thread-safe; cheap enough to stay on.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_bytes: dict[str, int] = {}
_calls: dict[str, int] = {}


def record(kind: str, nbytes: int) -> None:
    """Count one call of `kind` (e.g. "all_reduce", "gather", "pp_send") moving nbytes."""
    with _lock:
        _bytes[kind] = _bytes.get(kind, 0) + int(nbytes)
        _calls[kind] = _calls.get(kind, 0) + 1


def snapshot() -> dict[str, dict[str, int]]:
    """{kind: {"bytes": total payload bytes, "calls": number of calls}} since the last reset."""
    with _lock:
        return {k: {"bytes": _bytes[k], "calls": _calls[k]} for k in sorted(_bytes)}


def reset() -> None:
    """Forget every count (a benchmark calls this before the steps it measures)."""
    with _lock:
        _bytes.clear()
        _calls.clear()


def ring_all_reduce_wire_bytes(payload_bytes: int, world_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of payload_bytes: 2(N-1)/N of it."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 2 * (world_size - 1) / world_size * payload_bytes
