"""Moving one request's prompt K/V from a prefill server to a decode server (PD disaggregation).

Why an HTTP stream and not torch.distributed point-to-point: the two servers are independent
processes, possibly on different hosts, started separately and restarted separately, with no
shared rendezvous (no world size, no ranks, no store both joined). A process group would tie
their lives together (one side dying hangs or kills the other's collectives), while an HTTP
request is independent per request, has timeouts, goes through the API-key guard both servers
already have, and fails one request at a time. On GPUs the same frames would ride NCCL p2p (or
RDMA, as SGLang's Mooncake/NIXL connectors do) straight between device memories; here the cache
lives in host memory and the link is TCP, so a byte stream is the honest choice.

The wire format, one stream per request (the response body of POST /internal/pd/prefill):

    frame  := u32 big-endian header length | header (JSON, UTF-8) | payload (header["nbytes"])
    stream := meta | layer 0 | ... | layer L-1 | end

- meta: the first token, its log-probabilities, the prefix-cache hits, the K/V layout
  (layers, prompt tokens, KV heads, head dim, dtype float32, byte order); payload: the
  sampler's generator state (seeded requests) or nothing;
- layer i: payload K then V of layer i, each (prompt tokens, KV heads, head dim) float32;
- end: the number of layers and K/V bytes sent, so a stream cut anywhere is detected.

K/V bytes per request are therefore exactly 2 x layers x prompt_tokens x kv_heads x head_dim x 4
(`kv_transfer_bytes`): token slots, not whole blocks, so the two servers may use different
block sizes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.engine.prefilled import PrefilledPrompt

KV_MEDIA_TYPE = "application/x-minillm-kv"
WIRE_VERSION = 1
ELEMENT_BYTES = 4  # float32, the engine's KV cache type (KVCache.ELEMENT_BYTES)
_MAX_HEADER = 1 << 20


class TransferError(ValueError):
    """A stream that is not what this decode server can use (wrong layout, bad frames)."""


class TransferCut(TransferError):
    """The stream ended before its end frame: the connection was cut midway."""


class TransferCancelled(Exception):
    """The decode side gave up on the request (its client left) while receiving."""


@dataclass(frozen=True)
class KVLayout:
    """What one token's K/V looks like for a model: both sides must agree on it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_for(self, num_tokens: int) -> int:
        """2 (K and V) x layers x tokens x KV heads x head dim x 4 bytes (float32)."""
        return 2 * self.num_layers * num_tokens * self.num_kv_heads * self.head_dim * ELEMENT_BYTES


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 over a model's files (a GGUF file, or a folder's files in name order).

    Two servers pair only when they load the same bytes: equal shapes are not enough, since
    K/V computed by one set of weights is meaningless to another."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- sending
def _frame(header: dict, payload_size: int = 0) -> bytes:
    raw = json.dumps({**header, "nbytes": payload_size}).encode()
    return struct.pack(">I", len(raw)) + raw


def encode_prefilled(pre: PrefilledPrompt) -> Iterator[bytes]:
    """The frames of one prefilled prompt, layer by layer (nothing is joined in memory)."""
    kv = pre.kv.contiguous()
    _, num_layers, num_tokens, kv_heads, head_dim = kv.shape
    state = b"" if pre.generator_state is None else pre.generator_state.numpy().tobytes()
    top = None if pre.top_logprobs is None else [[t, lp] for t, lp in pre.top_logprobs.items()]
    meta = {
        "type": "meta",
        "version": WIRE_VERSION,
        "token_id": pre.token_id,
        "logprob": pre.logprob,
        "top_logprobs": top,
        "num_cached_tokens": pre.num_cached_tokens,
        "num_layers": num_layers,
        "num_prompt_tokens": num_tokens,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "byteorder": sys.byteorder,
    }
    yield _frame(meta, len(state)) + state
    per_layer = 2 * num_tokens * kv_heads * head_dim * ELEMENT_BYTES
    for layer in range(num_layers):
        yield _frame({"type": "layer", "layer": layer}, per_layer)
        yield kv[0, layer].numpy().tobytes()
        yield kv[1, layer].numpy().tobytes()
    yield _frame({"type": "end", "layers": num_layers, "kv_bytes": per_layer * num_layers})


# ---------------------------------------------------------------------------- receiving
class _Reader:
    """Exact reads over an iterator of byte chunks (an HTTP body), with a cancel check."""

    def __init__(self, chunks: Iterable[bytes], cancelled: threading.Event | None) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")
        self._cancelled = cancelled
        self.received = 0

    def into(self, out: memoryview, what: str) -> None:
        filled = 0
        while filled < len(out):
            if not self._buf:
                if self._cancelled is not None and self._cancelled.is_set():
                    raise TransferCancelled("the request was cancelled during the K/V transfer")
                try:
                    self._buf = memoryview(next(self._chunks))
                except StopIteration:
                    raise TransferCut(
                        f"the K/V stream ended in the middle of {what} "
                        f"({self.received} bytes received)"
                    ) from None
            n = min(len(out) - filled, len(self._buf))
            out[filled : filled + n] = self._buf[:n]
            self._buf = self._buf[n:]
            filled += n
            self.received += n

    def read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.into(memoryview(buf), what)
        return bytes(buf)

    def header(self, what: str) -> dict:
        (size,) = struct.unpack(">I", self.read(4, what))
        if size > _MAX_HEADER:
            raise TransferError(f"the K/V stream's {what} header claims {size} bytes")
        try:
            header = json.loads(self.read(size, what))
        except ValueError as e:
            raise TransferError(f"the K/V stream's {what} header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise TransferError(f"the K/V stream's {what} header is not an object")
        return header


def read_prefilled(
    chunks: Iterable[bytes],
    layout: KVLayout,
    num_prompt_tokens: int,
    cancelled: threading.Event | None = None,
) -> PrefilledPrompt:
    """Parse one stream into a PrefilledPrompt, checking it against this side's model layout
    and prompt. The K/V lands in one preallocated tensor (each byte copied once)."""
    r = _Reader(chunks, cancelled)
    meta = r.header("the meta frame")
    if meta.get("type") != "meta" or meta.get("version") != WIRE_VERSION:
        raise TransferError(f"the K/V stream does not start with a version-{WIRE_VERSION} meta")
    theirs = (meta.get("num_layers"), meta.get("num_kv_heads"), meta.get("head_dim"))
    ours = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    if theirs != ours:
        raise TransferError(
            f"the prefill server's K/V has (layers, KV heads, head dim) = {theirs}, this "
            f"server's model has {ours}: the two servers run different models"
        )
    if meta.get("num_prompt_tokens") != num_prompt_tokens:
        raise TransferError(
            f"the prefill server computed {meta.get('num_prompt_tokens')} prompt tokens, "
            f"this request has {num_prompt_tokens}"
        )
    if meta.get("dtype") != "float32" or meta.get("byteorder") != sys.byteorder:
        raise TransferError(
            f"the K/V is {meta.get('dtype')} {meta.get('byteorder')}-endian; this server "
            f"reads float32 {sys.byteorder}-endian"
        )
    state_bytes = r.read(int(meta["nbytes"]), "the generator state")
    state = torch.frombuffer(bytearray(state_bytes), dtype=torch.uint8) if state_bytes else None
    kv = torch.empty(
        (2, layout.num_layers, num_prompt_tokens, layout.num_kv_heads, layout.head_dim),
        dtype=torch.float32,
    )
    per_layer = layout.bytes_for(num_prompt_tokens) // layout.num_layers
    for layer in range(layout.num_layers):
        h = r.header(f"layer {layer}'s frame")
        if h.get("type") != "layer" or h.get("layer") != layer or h.get("nbytes") != per_layer:
            raise TransferError(f"the K/V stream's frame {h} is not layer {layer}")
        for i, part in enumerate(("K", "V")):
            view = memoryview(kv[i, layer].numpy()).cast("B")
            r.into(view, f"layer {layer}'s {part}")
    end = r.header("the end frame")
    if end.get("type") != "end" or end.get("layers") != layout.num_layers:
        raise TransferError(f"the K/V stream ends with {end}, not an end frame")
    top = meta.get("top_logprobs")
    return PrefilledPrompt(
        token_id=int(meta["token_id"]),
        logprob=float(meta["logprob"]),
        top_logprobs=None if top is None else {int(t): float(lp) for t, lp in top},
        generator_state=state,
        num_cached_tokens=int(meta.get("num_cached_tokens", 0)),
        kv=kv,
    )
