"""Durable file-system steps shared by the blob store, export and merge."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, out: Path, replace: bool) -> None:
    """Rename a finished directory to ``out``. With ``replace`` an existing ``out`` is
    moved aside first and deleted only once the new one is in, so ``out`` always holds a
    complete tree. Raises ``OSError`` (the old tree restored) if the rename fails."""
    old = None
    if replace and os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
