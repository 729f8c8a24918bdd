"""The store's folders: made on open, and refused when a link leads out of the store.

``gc`` and the other cleanups delete old files under ``tmp/``, ``blobs/`` and ``merged/``;
if one of them were a link to somewhere else they would delete there. A store whose folders
are links out of it on purpose (blobs on another disk) says so with ``LORAHUB_ALLOW_SYMLINKS=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import StoreError

FOLDERS = ("blobs", "tmp", "merged", "manifests", "bases")


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
