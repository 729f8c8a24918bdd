"""The blob directory: write-once files named by the xxh3-128 digest of their bytes.

Layout ``blobs/xxh128/<2 hex>/<30 hex>``, like git and dvc. A blob path only ever holds its
full, verified content: bytes go to a unique temp file in ``tmp/`` (same filesystem), are
hashed while written, fsynced, then published with ``link`` (which never overwrites) and the
directory is fsynced. A crash leaves at most a stray temp file, collected by ``gc``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .digest import ALGO, Digest, Hasher, hash_file, hash_stream
from .errors import IntegrityError, StoreError
from .fsutil import fsync_dir


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int
    mtime: float


def _disk_error(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while {what}; free some space and retry")
    return StoreError(f"{what} failed: {exc}")


class BlobStore:
    """Content-addressed files under ``root``; temp files under ``tmp``."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp

    def path(self, digest: Digest) -> Path:
        return self.root / ALGO / digest.hex[:2] / digest.hex[2:]

    def exists(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def put_bytes(self, data: bytes | memoryview, digest: Digest | None = None) -> Digest:
        """Store ``data``; a blob that already exists is not written again.

        Pass ``digest`` when it is already known, to skip hashing twice.
        """
        if digest is not None and self.exists(digest):
            return digest
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        hasher = Hasher()
        try:
            with open(tmp, "xb") as f:
                view = memoryview(data)
                step = 8 << 20
                for i in range(0, len(view), step):
                    chunk = view[i : i + step]
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = hasher.digest()
            if digest is not None and actual != digest:
                raise IntegrityError(f"bytes hash to {actual}, not the expected {digest}")
            self._publish(tmp, actual)
            return actual
        except OSError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise _disk_error(exc, "writing a blob") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_file(self, write: Callable[[Path], None]) -> tuple[Digest, int]:
        """Store the file that ``write(path)`` creates; returns its digest and size.

        The file is hashed after it is written while a second thread fsyncs it (both wait
        on the disk or the page cache, not the GIL), then published. When the blob is
        already there the new copy is dropped and the old one's mtime refreshed, so a
        concurrent ``gc`` sees it as young and keeps it.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        try:
            write(tmp)
            with open(tmp, "rb") as f, ThreadPoolExecutor(1) as pool:
                synced = pool.submit(os.fsync, f.fileno())
                digest, size = hash_stream(f)
                synced.result()
            try:
                os.utime(self.path(digest))
                return digest, size
            except FileNotFoundError:
                pass
            self._publish(tmp, digest)
            return digest, size
        except OSError as exc:
            raise _disk_error(exc, "writing a blob") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _publish(self, tmp: Path, digest: Digest) -> None:
        final = self.path(digest)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            # New fan-out folders must reach the disk too, or a power cut loses the blob
            # whose catalog row has survived.
            fsync_dir(final.parent.parent)
            fsync_dir(final.parent.parent.parent)
        try:
            os.link(tmp, final)  # never replaces: an existing blob is already complete
        except FileExistsError:
            return
        fsync_dir(final.parent)

    def open(self, digest: Digest):
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {digest} is missing from the store; run `lorahub verify`"
            ) from None

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def checked_path(self, digest: Digest) -> Path:
        """The blob's path once its bytes hash to its name, read in a stream (no copy in
        memory): a blob damaged on disk is an error here, not a merge, export or composition
        built on bad numbers. xxh3 costs about 1% of reading the file."""
        path = self.path(digest)
        try:
            actual, _ = hash_file(path)
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {digest} is missing from the store; run `lorahub verify`"
            ) from None
        if actual != digest:
            raise IntegrityError(
                f"blob {digest} is corrupt (its content hashes to {actual}); run `lorahub "
                "verify`, then remove and add the adapter again"
            )
        return path

    def verify(self, digest: Digest, size: int | None = None, quick: bool = False) -> str | None:
        """None when the blob is intact, else a sentence saying what is wrong."""
        path = self.path(digest)
        try:
            actual_size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size is not None and actual_size != size:
            return f"size is {actual_size}, expected {size}"
        if quick:
            return None
        actual, _ = hash_file(path)
        if actual != digest:
            return f"content hashes to {actual}"
        return None

    def delete(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def __iter__(self) -> Iterator[BlobInfo]:
        base = self.root / ALGO
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sorted(sub.iterdir()):
                try:
                    digest = Digest(sub.name + f.name)
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                yield BlobInfo(digest, st.st_size, st.st_mtime)

    def stale_temp_files(self, older_than: float) -> list[Path]:
        """Temp files left by interrupted writers, older than ``older_than`` seconds."""
        if not self.tmp.is_dir():
            return []
        cutoff = time.time() - older_than
        out = []
        for f in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if f.is_file() and f.stat().st_mtime < cutoff:
                    out.append(f)
        return out
