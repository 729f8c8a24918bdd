"""The blob directory: write-once files named by the xxh3-128 digest of their bytes.

Layout ``blobs/xxh128/<2 hex>/<30 hex>``, like git and dvc. A blob path only ever holds its
full, verified content: bytes go to a unique temp file in ``tmp/`` (same filesystem), are
hashed while written, fsynced, then published with ``link`` (which never overwrites) and the
directory is fsynced. A crash leaves at most a stray temp file, collected by ``gc``.
A blob is published read-only (0o444 less the umask): ``lorahub path`` and ``export --layout
vllm`` hard-link it into folders users see, and a tool rewriting such a file in place would
otherwise rewrite the store. Nothing here opens a blob for writing: a damaged one is replaced
by ``rename``, and quarantine and ``gc`` move or unlink it, which need only the folder's
permission.

A name is an xxh3 digest, which is not cryptographic: when a blob of that name exists, new
bytes are compared with it byte for byte before they are dropped as duplicates. Equal: the
old file is kept. Different, and the old file no longer hashes to its name: it was damaged
on disk and the new, good bytes replace it. Different, and both hash to the name: a crafted
collision, refused. Writers hold a shared lock on ``.tmp.lock`` (beside ``tmp/``) while
their temp file exists, and the temp sweep takes it exclusively, so ``gc`` never deletes a
write in flight.

:mod:`lorahub.s3blobs` keeps the same promises for blobs on S3-compatible storage
(``LORAHUB_BLOBS_URL``), as a subclass: callers that need a local file ask for
``checked_path`` (hashed) or ``local_path`` (for callers that hash or only link), never
``path``, which there names a cache file that may be absent; ``gc`` and ``fsck`` go through
``delete_unless_young`` and ``quarantine``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .digest import ALGO, Digest, hash_bytes, hash_file, hash_stream
from .errors import BlobCollision, CorruptData, DiskFull, IntegrityError, StoreError
from .fsutil import current_umask, fsync_dir

log = logging.getLogger(__name__)
WRITERS_LOCK = ".tmp.lock"


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int
    mtime: float


def check_expected(actual: Digest, expected: Digest | None) -> None:
    """Raise CorruptData when bytes meant to be ``expected`` hashed to ``actual``."""
    if expected is not None and actual != expected:
        raise CorruptData(
            f"bytes hash to {actual}, not the expected {expected}",
            expected=str(expected),
            actual=str(actual),
        )


def _disk_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on device while {what}; free some space and retry")
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

    def put_bytes(
        self,
        data: bytes | memoryview,
        digest: Digest | None = None,
        *,
        source: str = "",
        sync: bool = True,
    ) -> Digest:
        """Store ``data`` (compared with an existing blob of the same name, see the module
        docstring); ``digest``, when given, must be what the bytes hash to. ``sync=False``
        skips the fsyncs, for a caller that syncs the filesystem once after many writes."""
        actual = hash_bytes(data)
        check_expected(actual, digest)
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        try:
            with self.writing():
                with open(tmp, "xb") as f:
                    f.write(data)
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())
                _read_only(tmp)
                if not self._reuse(tmp, actual, source) and not self._publish(tmp, actual, sync):
                    self._reuse(tmp, actual, source)
            return actual
        except OSError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise _disk_error(exc, "writing a blob") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_file(
        self,
        write: Callable[[Path], None],
        *,
        source: str = "",
        expect: Digest | None = None,
    ) -> tuple[Digest, int]:
        """Store the file that ``write(path)`` creates; returns its digest and size.

        The file is hashed after it is written while a second thread fsyncs it (both wait
        on the disk or the page cache, not the GIL), then published. When the blob is
        already there and holds the same bytes, the new copy is dropped and the old one's
        mtime refreshed, so a concurrent ``gc`` sees it as young and keeps it.

        Raises:
            IntegrityError: the bytes do not hash to ``expect``, or they collide with a
                stored blob of the same name but other content (``source`` names them).
        """
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        try:
            with self.writing():
                write(tmp)
                with open(tmp, "rb") as f, ThreadPoolExecutor(1) as pool:
                    synced = pool.submit(os.fsync, f.fileno())
                    digest, size = hash_stream(f)
                    synced.result()
                check_expected(digest, expect)
                _read_only(tmp)
                # Published by another writer between the check and the link: compare again.
                if not self._reuse(tmp, digest, source) and not self._publish(tmp, digest):
                    self._reuse(tmp, digest, source)
                return digest, size
        except OSError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise _disk_error(exc, "writing a blob") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writers' shared lock: the temp sweep waits for writes in flight."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        with _flock(self.tmp.parent / WRITERS_LOCK, shared=True):
            yield

    def _reuse(self, tmp: Path, digest: Digest, source: str) -> bool:
        """True when a blob named ``digest`` already holds these bytes (its mtime is then
        refreshed); a damaged one is replaced by them, a colliding one refused."""
        final = self.path(digest)
        try:
            st = final.lstat()
            if stat.S_ISREG(st.st_mode) and _same_bytes(tmp, final):
                os.utime(final)
                return True
            damaged = not stat.S_ISREG(st.st_mode) or hash_file(final)[0] != digest
        except FileNotFoundError:  # not there, or a gc deleted it meanwhile: publish ours
            return False
        if not damaged:
            raise BlobCollision(
                f"the bytes of {source or 'the new adapter'} hash to {digest}, like the blob "
                f"already stored under that name, but differ from it: an xxh3 collision, "
                "crafted or accidental. Nothing was stored and the stored blob is unchanged",
                str(digest),
            )
        # Damaged on disk (or not a file at all): the new bytes are the real content.
        os.replace(tmp, final)
        fsync_dir(final.parent)
        log.warning("blob %s was damaged on disk; replaced by a good copy", digest)
        return True

    def _publish(self, tmp: Path, digest: Digest, sync: bool = True) -> bool:
        """Link ``tmp`` in under its name; False when a file of that name appeared first."""
        final = self.path(digest)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            # New fan-out folders must reach the disk too, or a power cut loses the blob
            # whose catalog row has survived.
            if sync:
                fsync_dir(final.parent.parent)
                fsync_dir(final.parent.parent.parent)
        try:
            os.link(tmp, final)  # never replaces what another writer published
        except FileExistsError:
            return False
        if sync:
            fsync_dir(final.parent)
        return True

    def open(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise CorruptData(
                f"blob {digest} is missing from the store; run `lorahub verify`",
                expected=str(digest),
                path=self.path(digest),
            ) from None

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def local_path(self, digest: Digest) -> Path:
        """A local file holding the blob, not re-hashed here: the blob itself in this store
        (it may be missing); an object store (:mod:`lorahub.s3blobs`) fetches a verified
        copy into its cache. For callers that hash the bytes themselves or only link them."""
        return self.path(digest)

    def checked_path(self, digest: Digest) -> Path:
        """The blob's path once its bytes hash to its name, read in a stream (no copy in
        memory): a blob damaged on disk is an error here, not a merge, export or composition
        built on bad numbers. xxh3 costs about 1% of reading the file."""
        path = self.path(digest)
        try:
            actual, _ = hash_file(path)
        except FileNotFoundError:
            raise CorruptData(
                f"blob {digest} is missing from the store; run `lorahub fsck`",
                expected=str(digest),
                path=path,
            ) from None
        if actual != digest:
            raise CorruptData(
                f"blob {digest} is corrupt (its content hashes to {actual}); run `lorahub "
                "fsck` to fetch it again from its source, or add the adapter again from its "
                "files (that replaces the damaged blob)",
                expected=str(digest),
                actual=str(actual),
                path=path,
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

    def delete_unless_young(self, digest: Digest, cutoff: float) -> bool | None:
        """For ``gc``, under the catalog's write lock: delete the blob unless it was written
        or refreshed at ``cutoff`` (epoch seconds) or later. True: deleted; False: young,
        kept; None: already gone."""
        path = self.path(digest)
        try:
            if path.lstat().st_mtime >= cutoff:
                return False
            path.unlink()
        except FileNotFoundError:
            return None
        return True

    def quarantine(self, digest: Digest, folder: Path) -> bool:
        """Move a damaged blob into ``folder`` (named by its hex), so it is never read as
        good data; False when it is not there."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.path(digest), folder / digest.hex)
        except FileNotFoundError:
            return False
        return True

    def __iter__(self) -> Iterator[BlobInfo]:
        """Every blob file; links and other non-files are skipped, never followed."""
        base = self.root / ALGO
        if not base.is_dir():
            return
        for sub in sorted(os.scandir(base), key=lambda e: e.name):
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in sorted(os.scandir(sub.path), key=lambda e: e.name):
                try:
                    digest = Digest(sub.name + f.name)
                    st = f.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield BlobInfo(digest, st.st_size, st.st_mtime)

    def any(self) -> bool:
        """Whether at least one blob file exists (cheap: stops at the first)."""
        return next(iter(self), None) is not None

    def sweep_temp(
        self, older_than: float, *, dry_run: bool = False
    ) -> list[tuple[Path | str, int]]:
        """Delete (or, ``dry_run``, list) temp files left by interrupted writers, older than
        ``older_than`` seconds. Holds the writers' lock exclusively, so a write in flight is
        never touched whatever the age; links are removed as links, never followed."""
        if not self.tmp.is_dir() or self.tmp.is_symlink():
            return []
        cutoff = time.time() - older_than
        out: list[tuple[Path | str, int]] = []
        with _flock(self.tmp.parent / WRITERS_LOCK, shared=False):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(entry.path)
                    out.append((Path(entry.path), st.st_size))
        return out


@contextlib.contextmanager
def _flock(path: Path, *, shared: bool) -> Iterator[None]:
    """An advisory ``flock`` on ``path`` (POSIX); elsewhere nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file {path}: {exc.strerror or exc} (if it is a link, "
            "remove it: lorahub makes its own)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_only(path: Path) -> None:
    """Make a temp file read-only (0o444 less the umask) before it is published, so the
    blob appears with that mode in one step and never holds a write bit."""
    os.chmod(path, 0o444 & ~current_umask())


def _same_bytes(a: Path, b: Path, chunk: int = 4 << 20) -> bool:
    """Byte-for-byte equality, read in a stream."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
