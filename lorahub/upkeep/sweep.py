"""Sweeping ``merged/``: what merges left behind (partial and replaced folders, per-key
lock files) and merged folders the catalog does not list. Each is judged at the moment it
is removed, under the lock a merge in flight holds, so a sweep never takes live work."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import db
from ..errors import StoreError
from ..fsutil import process_alive

if TYPE_CHECKING:
    from sqlalchemy import Engine

_LEFTOVER_RE = re.compile(r"^\..+\.(?:partial|old|evicted)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def sweep_merged(
    engine: Engine, merged_dir: Path, grace: float, *, dry_run: bool = False
) -> list[tuple[Path, int]]:
    """Leftovers in ``merged/`` older than ``grace``: partial and replaced folders of
    merges whose process is gone, old per-key lock files, and merged folders the catalog
    does not list. Links are removed as links, never followed."""
    from ..catalog import merged as merged_q

    if not merged_dir.is_dir() or merged_dir.is_symlink():
        return []
    cutoff = time.time() - grace
    with db.read_session(engine) as s:
        known = {Path(r.path).name for r in merged_q.all_rows(s)}
    out: list[tuple[Path, int]] = []
    for entry in os.scandir(merged_dir):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            continue
        name = entry.name
        m = _LEFTOVER_RE.match(name)
        if m:
            if ".partial-" in name and (
                process_alive(int(m.group("pid"))) or _merging(merged_dir, name)
            ):
                continue  # a merge in flight (here, or in another host's pid space)
        elif name.endswith(".lock") and _KEY_RE.match(name[:-5]):
            key = name[:-5]
            if key in known or os.path.lexists(entry.path[:-5]):
                continue
        elif not (_KEY_RE.match(name) and name not in known):
            continue
        size = _tree_size(Path(entry.path))
        doomed = Path(entry.path)
        if not (m or name.endswith(".lock")):
            claimed = _claim_unlisted(engine, merged_dir, doomed, dry_run=dry_run)
            if claimed is None:
                continue
            doomed = claimed
        if not dry_run:
            _remove(doomed)
        out.append((Path(entry.path), size))
    return out


def _claim_unlisted(engine: Engine, merged_dir: Path, path: Path, *, dry_run: bool) -> Path | None:
    """Take a merged folder the catalog does not list out of its key's name, under the
    lock ``merged get`` holds from its merge to its catalog row (``.locks/<2 hex>.lock``,
    tried without waiting): a ``merged get`` in flight that has published the folder and
    not yet recorded it keeps it, whatever the grace. Renamed before it is deleted, so a
    gc killed in the middle leaves a leftover the next gc collects, never a half-deleted
    folder under the key's name. Returns where it now is, or None to keep it."""
    from ..catalog import merged as merged_q
    from ..layout import merged_lock

    try:
        with merged_lock(merged_dir, path.name, wait=False) as held:
            if not held:
                return None  # a merge of this key space is at work
            with db.read_session(engine) as s:
                if any(Path(r.path).name == path.name for r in merged_q.all_rows(s)):
                    return None  # recorded since the scan
            if dry_run or path.is_symlink() or not path.is_dir():
                return path
            aside = path.with_name(f".{path.name}.evicted-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return None
            return aside
    except StoreError:  # a linked lock: leave the folder alone
        return None


def _merging(merged_dir: Path, leftover: str) -> bool:
    """Whether a ``merged get`` holds the lock of the key a ``.<key>.partial-*`` is for."""
    from ..layout import merged_lock

    key = leftover[1:33]
    if not _KEY_RE.match(key):
        return False
    try:
        with merged_lock(merged_dir, key, wait=False) as held:
            return not held
    except StoreError:
        return True  # cannot tell: keep it


def _tree_size(path: Path) -> int:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not follow links by default
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside
