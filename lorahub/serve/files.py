"""The files a served repo holds: the adapter's PEFT folder, as ``lorahub push`` uploads it.

The small files (``adapter_config.json``, ``README.md``, ``lorahub.json``) are made in memory
by :func:`lorahub.remote.push.push_small_files` (the bytes a push uploads) and kept there;
the weights are the store's blob itself, sent with ``sendfile``. Only a download needs the
blob's file: its size is the catalog's and its sha256 is kept (below), so model info, tree
listings and ``HEAD`` requests never fetch a blob from an object store (``LORAHUB_BLOBS_URL``)
once its sha256 is known.

The weights' sha256 (the LFS oid a client checks) costs a full read of the blob, so it is
computed once per blob for every process and restart: kept in ``<home>/serve/sha256/`` under
the blob's xxh128 digest (a blob never changes), written atomically, and computed under a
file lock, so ``--workers`` processes asked for the same new blob at once hash it once (the
others wait, then read the entry). An entry that is not 64 hex is recomputed; a store whose
folder cannot be written still serves, hashing once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..digest import Digest
from ..errors import StoreError
from ..formats import peft
from ..fsutil import write_atomic

if TYPE_CHECKING:
    from ..hub import Hub
    from ..info import AdapterInfo

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_KEPT = 4096  # repos whose small files stay in memory
_SHA256 = re.compile(rb"[0-9a-f]{64}\n?")
#: Where the weights' sha256 are kept, under the store's home.
SHA256_FOLDER = ("serve", "sha256")
WEIGHTS = peft.SAFETENSORS


def git_blob_sha1(data: bytes) -> str:
    """The oid git gives ``data`` (what the Hub sends as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file of an object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class RepoFile:
    """One file of a served repo: ``data`` for a small file; for the weights, ``sha256`` and
    ``fetch``, which gives the blob's local file (fetched only when asked: a download)."""

    name: str
    size: int
    data: bytes | None = None
    sha256: str | None = None  # set for the LFS file (the weights)
    fetch: Callable[[], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def is_lfs(self) -> bool:
        return self.fetch is not None

    @property
    def path(self) -> Path | None:
        """The weights' local file (on an object store, fetched into its cache when not
        there); None for a small file."""
        return self.fetch() if self.fetch is not None else None

    @property
    def etag(self) -> str:
        """The git oid: of the bytes, or of the LFS pointer for the weights."""
        if self.data is not None:
            return git_blob_sha1(self.data)
        assert self.sha256 is not None
        return git_blob_sha1(lfs_pointer(self.sha256, self.size))

    def tree_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "oid": self.etag,
            "size": self.size,
            "path": self.name,
        }
        if self.is_lfs:
            pointer = lfs_pointer(self.sha256 or "", self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


#: Set in a thread answering metadata (``lanes.py``): a sha256 not kept yet is not hashed
#: there, :class:`HashNeeded` is raised for another thread to hash it.
_DEFERRING: ContextVar[bool] = ContextVar("lorahub_defer_hashing", default=False)


class HashNeeded(Exception):
    """A blob's sha256 is not kept yet and hashing was deferred (:func:`deferring_hashes`):
    :meth:`hash` computes it (seconds per GB), then the request is asked again."""

    def __init__(self, cache: Sha256Cache, key: str, blob: Callable[[], Path]) -> None:
        super().__init__(key)
        self.cache, self.key, self.blob = cache, key, blob

    def hash(self) -> str:
        return self.cache.get(self.key, self.blob)


@contextlib.contextmanager
def deferring_hashes() -> Iterator[None]:
    """In this block, a sha256 that would need hashing raises :class:`HashNeeded` instead:
    the few threads answering metadata are never held for seconds by one large blob."""
    token = _DEFERRING.set(True)
    try:
        yield
    finally:
        _DEFERRING.reset(token)


class Sha256Cache:
    """Each blob's sha256 by its xxh128 digest: in memory, then in ``root``, else computed
    (once across processes, under a file lock) and written there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()
        self._hashing: dict[str, threading.Lock] = {}

    def entry(self, key: str) -> Path:
        """The file holding the sha256 of the blob whose xxh128 hex is ``key``."""
        return self.root / key[:2] / key[2:]

    def get(self, key: str, blob: Callable[[], Path]) -> str:
        """The sha256 of the blob whose xxh128 hex is ``key``; ``blob()`` gives its file,
        asked only when the value is not kept yet (it may fetch the blob)."""
        found = self._known.get(key)
        if found is not None:
            return found
        if _DEFERRING.get():
            found = self._read(key)  # one small file: not worth another thread
            if found is None:
                raise HashNeeded(self, key, blob)
            self._known[key] = found
            return found
        with self._lock:
            lock = self._hashing.setdefault(key, threading.Lock())
        with lock:  # threads of this process: one hashes, the others wait for it
            found = self._known.get(key) or self._read(key)
            if found is None:
                found = self._compute(key, blob)
            self._known[key] = found
        with self._lock:
            self._hashing.pop(key, None)
        return found

    def _read(self, key: str) -> str | None:
        try:
            data = self.entry(key).read_bytes()
        except OSError:
            return None
        if _SHA256.fullmatch(data) is None:
            log.warning(
                "ignoring a damaged sha256 entry %s; hashing the blob again", self.entry(key)
            )
            return None
        return data[:64].decode()

    def _compute(self, key: str, blob: Callable[[], Path]) -> str:
        """Hash ``blob`` and keep the result, under the lock shared by every process (one
        lock file per 256th of the key space, never deleted: deleting a lock file another
        process has open breaks the lock)."""
        from filelock import FileLock

        try:
            (self.root / ".locks").mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.root / ".locks" / f"{key[:2]}.lock"))
            lock.acquire()
        except OSError as exc:  # a read-only store: hash here, keep it in memory only
            log.warning("cannot keep sha256 values under %s: %s", self.root, exc)
            return _hash(blob())
        try:
            found = self._read(key)  # another process may have hashed it while we waited
            if found is not None:
                return found
            path = blob()
            value = _hash(path)
            entry = self.entry(key)
            try:
                entry.parent.mkdir(exist_ok=True)
                write_atomic(entry, f"{value}\n".encode(), sync=False)
            except OSError as exc:
                log.warning("cannot keep the sha256 of %s in %s: %s", path, entry, exc)
            return value
        finally:
            lock.release()


def _hash(blob: Path) -> str:
    h = hashlib.sha256()
    with blob.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class RepoFiles:
    """Each served adapter's files, made on first request and kept (thread safe)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self._small: OrderedDict[tuple[str, str], dict[str, bytes]] = OrderedDict()
        self.sha256s = Sha256Cache(hub.home.joinpath(*SHA256_FOLDER))

    def names(self) -> list[str]:
        from ..formats.peft_folder import FILES

        return list(FILES)

    def files(self, info: AdapterInfo, repo_id: str) -> dict[str, RepoFile]:
        """The repo's files by name, the weights' sha256 included."""
        small = self._small_files(info, repo_id)
        out: dict[str, RepoFile] = {}
        for name in self.names():
            if name == peft.SAFETENSORS:
                out[name] = self.weights(info)
            else:
                out[name] = RepoFile(name, len(small[name]), data=small[name])
        return out

    def weights(self, info: AdapterInfo) -> RepoFile:
        """The weights file alone (what a ``resolve`` of it needs: no card is rendered). Its
        size is the catalog's (the blob's, checked when it was stored) and its sha256 is
        kept: the blob's file is only looked for by ``fetch`` (a download)."""
        return RepoFile(WEIGHTS, info.size, sha256=self.sha256(info), fetch=self.fetcher(info))

    def sha256(self, info: AdapterInfo) -> str:
        """The weights blob's sha256, hashed once per blob for every process."""
        return self.sha256s.get(Digest.parse(info.weights_digest).hex, self.fetcher(info))

    def fetcher(self, info: AdapterInfo) -> Callable[[], Path]:
        """What gives the weights blob's local file, fetching it from an object store
        into its cache when not there."""
        return lambda: self.blob(info)

    def blob(self, info: AdapterInfo) -> Path:
        """The weights blob's local file (fetched when not there).

        Raises:
            StoreError: the blob is missing from this store.
        """
        path = self._hub.blobs.local_path(Digest.parse(info.weights_digest))
        if not path.is_file():
            raise StoreError(
                f"the weights blob of {info.short} is missing ({path}); "
                "`lorahub verify` checks the store, `lorahub fsck` repairs what it can"
            )
        return path

    def card_base(self, info: AdapterInfo) -> str | None:
        """The base the served card and config name (a push's: ``published_base``)."""
        from ..formats.peft_folder import published_base

        return published_base(info, recorded_base=self._hub.base_repo_id(info))[1]

    def card_data(self, info: AdapterInfo, base: str | None) -> dict[str, Any]:
        """The model card's metadata (``cardData``), made without rendering the card (model
        info needs no file's bytes); ``base`` is :meth:`card_base`'s."""
        from ..card import adapter_card_data

        return adapter_card_data(info, base_model_id=base)

    def _small_files(self, info: AdapterInfo, repo_id: str) -> dict[str, bytes]:
        key = (info.digest, repo_id)
        with self._lock:
            if key in self._small:
                self._small.move_to_end(key)
                return self._small[key]
        from ..remote.push import push_small_files

        recorded = self._hub.base_repo_id(info)
        small = push_small_files(info, title=repo_id, recorded_base=recorded)
        with self._lock:
            self._small[key] = small
            while len(self._small) > _KEPT:
                self._small.popitem(last=False)
        return small
