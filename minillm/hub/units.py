"""Human-readable numbers for `minillm list` and `minillm show` (Ollama prints "98 MB", "134.5M")."""

from __future__ import annotations


def human_count(n: int) -> str:
    """A parameter count as Ollama shows it: 134515008 -> "134.5M"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def human_bytes(n: int) -> str:
    """Decimal units like `ollama list`: 98362432 -> "98 MB", 1_900_000_000 -> "1.9 GB"."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    if unit == "B":
        return f"{n} B"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
