"""Sizes for people: the one formatter the library's messages and the CLI's tables share."""

from __future__ import annotations


def human_size(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000, like disk vendors and ``hf``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
