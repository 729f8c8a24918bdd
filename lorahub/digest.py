"""xxh3-128 digests, written ``xxh128:<32 hex>``, for blobs, manifests and tensor streams.

xxh3 is not cryptographic; it names content we produced or verified ourselves, and it is
fast enough (10+ GB/s) that hashing never dominates disk I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from .errors import InvalidReference

ALGO = "xxh128"
HEX_LEN = 32
CHUNK = 4 << 20
_DIGEST_RE = re.compile(r"^xxh128:([0-9a-f]{32})$")


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
        return self.hex[:12]

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


def hash_stream(stream: BinaryIO, chunk: int = CHUNK) -> tuple[Digest, int]:
    """Digest and size of everything left in a binary stream."""
    h = Hasher()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := stream.readinto(buf):  # type: ignore[attr-defined]
        h.update(view[:n])
    return h.digest(), h.size


def hash_file(path: str | Path) -> tuple[Digest, int]:
    """Digest and size of a file, read in chunks."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f)


def hash_chunks(chunks: Iterable[bytes | memoryview]) -> Digest:
    """Digest of the concatenation of chunks (e.g. tensor bytes in name order)."""
    h = Hasher()
    for c in chunks:
        h.update(c)
    return h.digest()


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the one byte form a manifest is hashed in."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
