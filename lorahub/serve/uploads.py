"""LFS objects uploaded to ``lorahub serve``, staged until a commit names them.

The client's ``PUT`` carries no ``Authorization``, so each upload URL authorises itself: it
names the repo, the oid and the size, and carries an expiry and an HMAC of them under a key
kept in the store (``serve/upload.key``, 0600), which every ``--workers`` process shares.

Objects are staged per repo, in ``serve/lfs/<ns>/<name>/``: the repo the signed URL names is
the only one whose commits find the object there, so a writer of one namespace cannot commit
(and then read) an object uploaded for another. A body is streamed to
``<oid>-<pid>-<rand>.partial`` there, its sha256 computed and its size counted as it
arrives: past the server's cap or the announced size it is refused (413) at once, short or
with another sha256 it is refused (400), and a client that drops leaves nothing; each time
the partial file is removed. A complete object is renamed to ``<oid>``.

The staging area is not in ``tmp/``: ``lorahub gc`` sweeps ``tmp/`` by age, and an upload
in flight, or an object staged between the LFS batch and the commit, must survive a
``gc --grace 0``. The server collects the area itself (:meth:`Uploads.collect`, when it
starts and then at most hourly): partial files of its dead processes (a SIGKILL), and
partial or staged files untouched for :data:`STAGED_LIFETIME` (an abandoned push). A
commit removes the staged weights it stored; an object the LFS batch API finds staged again
is touched, so it lives until the commit that follows.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

from starlette.concurrency import run_in_threadpool

from ..fsutil import process_alive
from .errors import HubError, disk_failure

log = logging.getLogger(__name__)

#: The upload cap when none is given (``lorahub serve --max-upload-size``).
DEFAULT_MAX_UPLOAD = 10 * 10**9
#: How long an upload URL stays valid.
URL_LIFETIME = 24 * 3600
#: How long a staged object (or a partial one) is kept untouched before it is collected.
STAGED_LIFETIME = URL_LIFETIME
#: How often a running server collects its staging area (each process, at most).
COLLECT_EVERY = 3600
STAGING = "lfs"  # under serve/
OID = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL = re.compile(r"^[0-9a-f]{64}-(?P<pid>\d+)-[0-9a-f]{8}\.partial$")
COMMIT_DIR = re.compile(r"^serve-commit-(?P<pid>\d+)-[0-9a-f]{8}$")
_SIZE = re.compile(r"^[0-9]{1,20}$")
_BUFFER = 1 << 20  # bytes gathered before one write (and hash) in a worker thread


def check_oid(oid: object) -> str:
    """``oid`` if it is a sha256 in lowercase hex, else a 400."""
    if not isinstance(oid, str) or not OID.match(oid):
        raise HubError(400, f"invalid LFS oid {oid!r}: expected 64 lowercase hex digits (sha256)")
    return oid


def parse_size(text: str | None) -> int | None:
    """A size from a URL or header: ASCII digits, at most 20 of them (``int()`` alone takes
    other Unicode digits and refuses over 4300 of them, both a 500); None if not one."""
    if text is None or not _SIZE.match(text):
        return None
    return int(text)


class Uploads:
    """The staging area (``serve/lfs/``), the commit folders' ``tmp``, and the upload URLs'
    key (kept in ``serve_dir``)."""

    def __init__(self, tmp: Path, serve_dir: Path, max_size: int) -> None:
        self.tmp = tmp
        self.root = serve_dir / STAGING
        self.max_size = max_size
        self._key_dir = serve_dir
        self._key: bytes | None = None
        self._collected = 0.0
        self._collecting = threading.Lock()

    # ------------------------------------------------------------------ the URLs

    def _secret(self) -> bytes:
        """The store's upload key, made once (by whichever process comes first)."""
        if self._key is not None:
            return self._key
        path = self._key_dir / "upload.key"
        if not path.is_file():
            try:
                self._make_key(path)
            except OSError as exc:  # a full disk: no upload can be staged either
                raise disk_failure(exc, "the upload") from None
        key = path.read_bytes()
        if len(key) != 32:
            raise HubError(500, f"the upload key {path} is damaged: remove it and restart")
        self._key = key
        return key

    def _make_key(self, path: Path) -> None:
        """Write a new key to ``path``, unless another process did first."""
        self._key_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._key_dir / f".upload.key.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never replaces a key another worker made first
        finally:
            tmp.unlink()

    def _signature(self, repo_id: str, oid: str, size: int, expires: int) -> str:
        text = f"{repo_id}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self._secret(), text, hashlib.sha256).hexdigest()

    def upload_path(self, repo_id: str, oid: str, size: int) -> str:
        """The path (and query) of the PUT that uploads ``oid`` to ``repo_id``."""
        expires = int(time.time()) + URL_LIFETIME
        sig = self._signature(repo_id, oid, size, expires)
        return f"/lorahub-lfs/{repo_id}/{oid}/{size}?expires={expires}&sig={sig}"

    def check_url(self, repo_id: str, oid: str, size: int, expires: str, sig: str) -> None:
        """Refuse (403) an upload URL this server did not sign, or one that expired."""
        when = parse_size(expires)
        if when is None:
            raise HubError(403, "invalid upload URL: ask the LFS batch API for a new one")
        good = self._signature(repo_id, oid, size, when)
        if not hmac.compare_digest(good.encode(), sig.encode("utf-8", "replace")):
            raise HubError(403, "invalid upload URL: ask the LFS batch API for a new one")
        if when < time.time():
            raise HubError(403, "this upload URL has expired: ask the LFS batch API for a new one")

    # ------------------------------------------------------------------ staged objects

    def _folder(self, repo_id: str) -> Path:
        """The repo's staging folder (``repo_id``: checked by Mapping.names, or signed)."""
        return self.root / repo_id

    def staged(self, repo_id: str, oid: str) -> Path | None:
        """The object ``oid`` staged for ``repo_id``, if it is there."""
        path = self._folder(repo_id) / check_oid(oid)
        return path if path.is_file() and not path.is_symlink() else None

    def touch(self, path: Path) -> None:
        """Keep a staged object a full :data:`STAGED_LIFETIME` from now (a commit or a
        batch is about to use it)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def discard(self, repo_id: str, oid: str) -> None:
        """Remove a staged object once a commit has stored it."""
        with contextlib.suppress(FileNotFoundError):
            (self._folder(repo_id) / check_oid(oid)).unlink()

    async def receive(
        self,
        chunks: AsyncIterator[bytes],
        repo_id: str,
        oid: str,
        size: int,
        declared: int | None,
    ) -> Path:
        """Stream a PUT body into ``repo_id``'s staging folder as object ``oid`` of
        ``size`` bytes.

        ``declared`` is the request's Content-Length, if any: one over the cap is refused
        before a byte is read. Every refusal, and a dropped client (the exception the body
        iterator raises then propagates), removes the partial file.

        Raises:
            HubError: 413 past the cap or ``size``; 400 for too few bytes or another
                sha256.
        """
        if size > self.max_size or (declared is not None and declared > self.max_size):
            raise HubError(413, self._too_large(max(size, declared or 0)))
        if declared is not None and declared != size:
            raise HubError(400, f"Content-Length {declared} is not the announced size {size}")
        folder = self._folder(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{oid}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        fh = open(partial, "xb")  # noqa: SIM115 - closed in the finally below
        sha = hashlib.sha256()
        count = 0
        buffer: list[bytes] = []
        buffered = 0

        def flush(parts: list[bytes]) -> None:
            for part in parts:
                sha.update(part)
                fh.write(part)

        done = False
        try:
            async for chunk in chunks:
                count += len(chunk)
                if count > self.max_size:
                    raise HubError(413, self._too_large(count))
                if count > size:
                    raise HubError(413, f"the body is longer than the announced {size} bytes")
                buffer.append(chunk)
                buffered += len(chunk)
                if buffered >= _BUFFER:
                    await _written(flush, buffer, oid)
                    buffer, buffered = [], 0
            await _written(flush, buffer, oid)
            if count != size:
                raise HubError(400, f"got {count} bytes, {size} were announced")
            if sha.hexdigest() != oid:
                raise HubError(
                    400, f"the bytes uploaded hash to sha256 {sha.hexdigest()}, not the oid {oid}"
                )
            await _written(_finish, fh, oid)
            final = folder / oid
            try:
                os.replace(partial, final)
            except FileNotFoundError:  # collected: the client stalled a whole lifetime
                raise HubError(400, "the upload took too long and was collected: retry") from None
            done = True
            log.info("staged LFS object %s for %s (%d bytes)", oid, repo_id, size)
            return final
        finally:
            if not fh.closed:
                # Its buffered bytes may not fit either: the partial file goes anyway.
                with contextlib.suppress(OSError):
                    fh.close()
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()

    def _too_large(self, size: int) -> str:
        return (
            f"upload of {size} bytes refused: this server accepts at most {self.max_size} "
            "bytes per file (lorahub serve --max-upload-size)"
        )

    # ------------------------------------------------------------------ collection

    def collect(self, now: float | None = None) -> list[Path]:
        """Remove what no request will use any more: the partial uploads and commit
        folders (in ``tmp``) of this server's processes that are gone (a SIGKILL), and
        partial or staged objects untouched for :data:`STAGED_LIFETIME`. Only names this
        module makes; links are removed as links, never followed."""
        now = time.time() if now is None else now
        cutoff = now - STAGED_LIFETIME
        out: list[Path] = []
        for entry in _entries(self.tmp):
            m = COMMIT_DIR.match(entry.name)
            if m and not process_alive(int(m.group("pid"))):
                shutil.rmtree(entry.path, ignore_errors=True)
                out.append(Path(entry.path))
        for ns in _entries(self.root):
            for repo in _entries(Path(ns.path)) if _is_dir(ns) else ():
                for entry in _entries(Path(repo.path)) if _is_dir(repo) else ():
                    if _stale(entry, cutoff):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        out.append(Path(entry.path))
        self._collected = now
        if out:
            log.info("removed %d abandoned upload(s) and commit folder(s)", len(out))
        return out

    def collect_now_and_then(self) -> None:
        """:meth:`collect`, when this process has not for :data:`COLLECT_EVERY` seconds
        (a long-running server collects abandoned pushes without a restart)."""
        if time.time() - self._collected < COLLECT_EVERY:
            return
        if not self._collecting.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            self.collect()
        except OSError as exc:  # a read-only store: nothing to collect there anyway
            log.warning("could not collect abandoned uploads under %s: %s", self.root, exc)
            self._collected = time.time()
        finally:
            self._collecting.release()


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of ``folder``: none if it is missing or a link."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return list(it)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _stale(entry: os.DirEntry[str], cutoff: float) -> bool:
    """Whether a staging entry is to go: a partial file of a dead process, or an object or
    partial file untouched since ``cutoff``; anything else this module never makes."""
    m = _PARTIAL.match(entry.name)
    if not m and not OID.match(entry.name):
        return False
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    if st.st_mtime < cutoff:
        return True
    return m is not None and not process_alive(int(m.group("pid")))


async def _written(write: Callable[[Any], None], arg: Any, oid: str) -> None:
    """``write(arg)`` in a thread; a failed write (a full disk) is the client's 507 or 500
    (the caller removes the partial file)."""
    try:
        await run_in_threadpool(write, arg)
    except OSError as exc:
        raise disk_failure(exc, f"LFS object {oid}") from None


def _finish(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
