"""The engine's per-token {token_id: logprob} dicts in the two layouts of the OpenAI API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TokenText = Callable[[int], str]  # token id -> its text (ServingEngine.token_text, cached)


def chat_logprobs(
    text: TokenText, token_ids: list[int], dicts: list[dict[int, float]], top: int
) -> dict[str, Any]:
    """Chat completions: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    content = []
    for tid, d in zip(token_ids, dicts, strict=False):
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                "token": text(tid),
                "logprob": d.get(tid, float("-inf")),
                "bytes": list(text(tid).encode()),
                "top_logprobs": [
                    {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                    for t, lp in best
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    text: TokenText,
    token_ids: list[int],
    dicts: list[dict[int, float]],
    top: int,
    offset: int = 0,
) -> dict[str, Any]:
    """Legacy completions: parallel lists of tokens, logprobs, top dicts and text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, d in zip(token_ids, dicts, strict=False):
        tokens.append(text(tid))
        lps.append(d.get(tid))
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        tops.append({text(t): lp for t, lp in best} if top else None)
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
