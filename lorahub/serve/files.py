"""The files a served repo holds: the adapter's PEFT folder, as ``lorahub push`` uploads it.

The small files (``adapter_config.json``, ``README.md``, ``lorahub.json``) are written by
:func:`lorahub.remote.push.write_push_files` into a temporary folder and kept in memory;
the weights are the store's blob itself, sent with ``sendfile``. The weights' sha256 (the
LFS oid a client checks) is computed once per blob, under a lock, and kept in memory.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..digest import Digest
from ..formats import peft

if TYPE_CHECKING:
    from ..hub import Hub
    from ..info import AdapterInfo

_CHUNK = 8 << 20
_KEPT = 1024  # repos whose small files stay in memory


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
    """One file of a served repo: ``data`` for a small file, ``path`` for the weights."""

    name: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    sha256: str | None = None  # set for the LFS file (the weights)

    @property
    def is_lfs(self) -> bool:
        return self.path is not None

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


class RepoFiles:
    """Each served adapter's files, made on first request and kept (thread safe)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self._small: OrderedDict[tuple[str, str], dict[str, bytes]] = OrderedDict()
        self._sha256: dict[str, str] = {}
        self._hashing: dict[str, threading.Lock] = {}

    def names(self) -> list[str]:
        from ..formats.peft_folder import FILES

        return list(FILES)

    def files(self, info: AdapterInfo, repo_id: str) -> dict[str, RepoFile]:
        """The repo's files by name, the weights' sha256 included."""
        small = self._small_files(info, repo_id)
        blob = self._blob(info)
        out: dict[str, RepoFile] = {}
        for name in self.names():
            if name == peft.SAFETENSORS:
                size = blob.stat().st_size
                out[name] = RepoFile(name, size, path=blob, sha256=self.sha256(info))
            else:
                out[name] = RepoFile(name, len(small[name]), data=small[name])
        return out

    def sha256(self, info: AdapterInfo) -> str:
        """The weights blob's sha256, hashed once per blob."""
        key = info.weights_digest
        if key in self._sha256:
            return self._sha256[key]
        with self._lock:
            lock = self._hashing.setdefault(key, threading.Lock())
        with lock:
            if key not in self._sha256:
                h = hashlib.sha256()
                with self._blob(info).open("rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                self._sha256[key] = h.hexdigest()
        return self._sha256[key]

    def _blob(self, info: AdapterInfo) -> Path:
        return self._hub.blobs.path(Digest.parse(info.weights_digest))

    def _small_files(self, info: AdapterInfo, repo_id: str) -> dict[str, bytes]:
        key = (info.digest, repo_id)
        with self._lock:
            if key in self._small:
                self._small.move_to_end(key)
                return self._small[key]
        from ..remote.push import write_push_files

        recorded = self._hub.base_repo_id(info)
        with tempfile.TemporaryDirectory(prefix="lorahub-serve-") as tmp:
            written = write_push_files(
                info, self._blob(info), Path(tmp), title=repo_id, recorded_base=recorded
            )
            small = {
                name: path.read_bytes()
                for name, path in written.items()
                if name != peft.SAFETENSORS
            }
        with self._lock:
            self._small[key] = small
            while len(self._small) > _KEPT:
                self._small.popitem(last=False)
        return small
