"""xxh3-128 digests, written ``xxh128:<32 hex>``, for blobs, manifests and tensor streams.

xxh3 is not cryptographic; it names content we produced or verified ourselves, and it is
fast enough (10+ GB/s) that hashing never dominates disk I/O.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .errors import InvalidReference

ALGO = "xxh128"
PREFIX = f"{ALGO}:"
SHORT_LEN = 12
CHUNK = 4 << 20
_DIGEST_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{32}})$")


@dataclass(frozen=True, order=True)
class Digest:
    """A content digest; ``str(d)`` is the canonical ``xxh128:<hex>`` form."""

    hex: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{32}", self.hex):
            raise InvalidReference(f"not an xxh128 digest: {self.hex!r}")

    def __str__(self) -> str:
        return f"{ALGO}:{self.hex}"

    @property
    def short(self) -> str:
        """The 12-hex form shown in listings."""
        return short(self.hex)

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``xxh128:<hex>`` (or a bare 32-hex string)."""
        text = text.strip().lower()
        m = _DIGEST_RE.match(text)
        if m:
            return cls(m.group(1))
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return cls(text)
        raise InvalidReference(f"not an xxh128 digest: {text!r} (expected 'xxh128:<32 hex>')")


class Hasher:
    """Incremental xxh3-128, for hashing while writing or streaming."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self._h.hexdigest())


def hash_bytes(data: bytes | bytearray | memoryview) -> Digest:
    """Digest of a byte string."""
    return Digest(xxhash.xxh3_128_hexdigest(data))


def hash_stream(stream: io.RawIOBase | io.BufferedIOBase, chunk: int = CHUNK) -> tuple[Digest, int]:
    """Digest and size of everything left in a binary stream."""
    h = Hasher()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := stream.readinto(buf):
        h.update(view[:n])
    return h.digest(), h.size


def hash_file(path: str | Path) -> tuple[Digest, int]:
    """Digest and size of a file, read in chunks."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f)


def short(digest: str) -> str:
    """The 12-hex form shown in listings, of ``xxh128:<hex>`` or of a bare hex; a placeholder
    like ``"-"`` comes back as it is. Example: ``short("xxh128:0123456789abcdef...")`` ->
    ``"0123456789ab"``."""
    return digest.removeprefix(PREFIX)[:SHORT_LEN]


def hex_prefix(text: str, min_len: int) -> str | None:
    """The hex digits of ``text`` (with or without ``xxh128:``, any case) when it can be the
    start of a digest at least ``min_len`` digits long; None for a name, path or short text."""
    hexpart = text.lower().removeprefix(PREFIX)
    if len(hexpart) >= min_len and all(c in "0123456789abcdef" for c in hexpart):
        return hexpart
    return None


def prefix_range(prefix: str) -> tuple[str, str]:
    """Bounds ``(lo, hi)`` such that ``lo <= d < hi`` holds exactly for the digests starting
    with ``prefix`` (hex, with or without ``xxh128:``).

    A range on a digest's unique index instead of ``LIKE``, which SQLite will not index here;
    the same bounds serve the plain-SQL reads (``col >= ? AND col < ?``) and ORM queries.
    ``"g"`` sorts right after every hex digit.

    Example: ``prefix_range("ab12")`` -> ``("xxh128:ab12", "xxh128:ab12g")``.
    """
    lo = prefix if prefix.startswith(PREFIX) else PREFIX + prefix
    return lo, lo + "g"


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the one byte form a manifest is hashed in."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
