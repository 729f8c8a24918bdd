"""The store's folders: made on open, and refused when a link leads out of the store.

``gc`` and the other cleanups delete old files under ``tmp/``, ``blobs/``, ``merged/`` and
``paths/``; if one of them were a link to somewhere else they would delete there. A store
whose folders are links out of it on purpose (blobs on another disk) says so with
``LORAHUB_ALLOW_SYMLINKS=1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError

FOLDERS = ("blobs", "tmp", "merged", "manifests", "bases", "paths")


def prepare(home: Path, *, allow_symlinks: bool = False) -> None:
    """Create the store's folders; refuse ones that are links out of the store."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        for sub in FOLDERS:
            path = home / sub
            if path.is_symlink() and not allow_symlinks:
                target = os.path.realpath(path)
                if not Path(target).is_relative_to(home.resolve()):
                    raise StoreError(
                        f"{path} is a link to {target}: lorahub deletes old files in its store "
                        "folders and will not follow a link out of the store. Make it a real "
                        "folder, or set LORAHUB_ALLOW_SYMLINKS=1 if it points there on purpose"
                    )
            path.mkdir(exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store at {home}: {exc}") from exc


@contextlib.contextmanager
def merged_lock(merged: Path, key: str, *, wait: bool = True) -> Iterator[bool]:
    """Held by ``merged get`` from its merge to its catalog row, and by ``gc`` before it
    takes an unlisted merged folder: yields True once held, or False at once when
    ``wait=False`` and another process holds it. One lock file per 256th of the key space
    (``merged/.locks/ab.lock``): a bounded set that is never deleted, since deleting a lock
    file another process has open breaks the lock."""
    from filelock import FileLock, Timeout

    locks = merged / ".locks"
    path = locks / f"{key.split(':')[-1][:2]}.lock"
    lock = FileLock(str(path), timeout=-1 if wait else 0)
    try:
        locks.mkdir(exist_ok=True)
        if locks.is_symlink() or path.is_symlink():
            raise StoreError(f"{path} is a link; remove it (lorahub makes its own lock files)")
        lock.acquire()
    except Timeout:
        yield False
        return
    except OSError as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"cannot lock {path}: {exc}") from exc
    try:
        yield True
    finally:
        lock.release()
