"""Sizes for people: the formatter the library's messages and the CLI's tables share, and the
parser of the sizes people type (``--max-shard-size 2GB``, ``LORAHUB_MERGED_MAX_BYTES``)."""

from __future__ import annotations

import re

from .errors import InvalidMergeArgument


def human_size(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000, like disk vendors and ``hf``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from a size like ``"5GB"`` (10^9), ``"2GiB"`` (2^30), ``"500MB"`` or ``"1024"``.

    Raises:
        InvalidMergeArgument: not a positive size with a known unit (an ``InvalidArgument``,
            and a ``MergeError`` as it was when merge options were its only users).

    Example::

        parse_size("2GiB")  # 2147483648
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.fullmatch(str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise InvalidMergeArgument(
                f"not a size: {text!r}; write a number with a unit, e.g. 5GB, 500MB or 2GiB"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise InvalidMergeArgument(f"size must be positive, got {text!r}")
    return size
