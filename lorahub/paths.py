"""Folders ``PeftModel.from_pretrained`` loads straight from the store, with no copy of the
weights: what ``Hub.path`` and ``lorahub path`` return.

Each stored adapter gets, the first time it is asked for, ``<home>/paths/<digest hex>/``::

    adapter_config.json         written (read-only)
    README.md                   written (read-only): the model card ``export`` writes
    lorahub.json                written (read-only): digest, manifest and this file list
    adapter_model.safetensors   a hard link to the store's blob (a symbolic link to it
                                where the filesystem refuses a hard link); never a copy

The folder is built beside its final place and renamed there in one step, so a reader sees
it complete or not at all; later calls return it as it is, once it is checked to still link
the adapter's blob (a blob ``fsck`` or ``add`` replaced, or a store that moved, gets a new
folder). The written files are made read-only; the weights file is the blob itself, whose
mode is left alone: do not write to it (``lorahub verify`` would find the blob damaged).

``gc`` removes the folders of adapters the catalog no longer lists (after ``rm``), and the
leftovers of builds a crash interrupted, so a removed adapter's bytes are freed with its
blob. While an adapter is stored its blob is kept, whatever links it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Collection
from pathlib import Path

from .blobs import BlobStore
from .digest import PREFIX, Digest
from .errors import LorahubError, StoreError
from .formats.lorahub_json import FILENAME as MARKER
from .formats.peft import CONFIG, SAFETENSORS
from .formats.peft_folder import README, write_peft_folder
from .fsutil import current_umask, fsync_dir, publish_dir
from .info import AdapterInfo

FOLDER = "paths"  # under the store's home
FILES = (CONFIG, SAFETENSORS, README, MARKER)
_TMP = ".tmp-"  # a build in progress, or one a crash left: ``.tmp-<hex>-<pid>-<rand>``
_LINK_REFUSED = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP)


def adapter_path(blobs: BlobStore, info: AdapterInfo, root: Path) -> Path:
    """The folder under ``root`` that holds ``info`` for ``PeftModel.from_pretrained``,
    made on the first call and returned as it is on the next ones (see the module docstring).

    Args:
        blobs: the store's blobs (the weights are linked from there).
        info: the stored adapter.
        root: ``<home>/paths``.

    Returns:
        ``root / <digest hex>``.

    Raises:
        CorruptData: the adapter's blob is missing or damaged; nothing was made.
        StoreError: the folder cannot be written (permissions, a full disk).

    Example:
        >>> adapter_path(hub.blobs, hub.get("sql-expert:v1"), hub.home / "paths")  # doctest: +SKIP
        PosixPath('/home/me/.local/share/lorahub/paths/3f9c...')
    """
    digest = Digest.parse(info.digest)
    dest = root / digest.hex
    blob = blobs.path(Digest.parse(info.weights_digest))
    if is_current(dest, info, blob):
        return dest
    blob = blobs.checked_path(Digest.parse(info.weights_digest))  # hashed before it is linked
    try:
        root.mkdir(exist_ok=True)
        tmp = root / f"{_TMP}{digest.hex}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        write_peft_folder(info, blob, tmp, copy_weights=False, fsync=True)
        for name in (CONFIG, README, MARKER):  # the files written here; never the blob
            _read_only(tmp / name)
        link_blob(blob, tmp / SAFETENSORS)
        fsync_dir(tmp)
        _publish(tmp, dest, info, blob)
    except LorahubError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path, info: AdapterInfo, blob: Path) -> None:
    """Rename the finished folder into place. Another process may have published its own
    first: a current one is kept (ours is dropped); a stale one is replaced."""
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        if is_current(dest, info, blob):
            return
        publish_dir(tmp, dest, replace=True)
        return
    fsync_dir(dest.parent)


def is_current(folder: Path, info: AdapterInfo, blob: Path) -> bool:
    """Whether ``folder`` is a path folder of ``info`` whose weights are ``blob`` (the same
    file, not a copy) of the size the manifest records. Cheap: the blob is not re-hashed."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        if set(os.listdir(folder)) != set(FILES):
            return False
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("digest") != info.digest:
            return False
        if link_kind(folder / SAFETENSORS, blob) is None:
            return False
        return os.stat(blob).st_size == info.size
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def link_blob(blob: Path, path: Path) -> str:
    """Make ``path`` the blob's bytes without copying them: a hard link (``"hardlink"``),
    else, where the filesystem refuses one (another filesystem, no hard links, too many),
    a symbolic link to the blob's absolute path (``"symlink"``)."""
    try:
        os.link(blob, path)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in _LINK_REFUSED:
            raise
    os.symlink(os.path.abspath(blob), path)
    return "symlink"


def link_kind(path: Path, blob: Path) -> str | None:
    """How ``path`` is ``blob``: ``hardlink`` (the same file), ``symlink`` (a link to the
    blob's absolute path), or None."""
    try:
        if os.path.islink(path):
            target = os.readlink(path)
            return "symlink" if target == os.path.abspath(blob) and blob.is_file() else None
        st, b = os.stat(path), os.stat(blob)
    except OSError:
        return None
    return "hardlink" if (st.st_dev, st.st_ino) == (b.st_dev, b.st_ino) else None


def _read_only(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o222)


def sweep(
    root: Path, live: Collection[str], *, grace: float, dry_run: bool = False
) -> list[tuple[Path, int]]:
    """Remove the path folders of adapters not in ``live`` (digests), and builds a crash
    left that are older than ``grace`` seconds; returns each with the bytes it frees (its
    files that nothing else links: a weights link frees its bytes once the blob is gone).
    Anything else under ``root`` is left alone; links are never followed."""
    if not root.is_dir() or root.is_symlink():
        return []
    cutoff = time.time() - grace
    out: list[tuple[Path, int]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.startswith(_TMP):
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
            elif not _is_hex(entry.name) or PREFIX + entry.name in live:
                continue
            size = _freed_bytes(Path(entry.path))
        except FileNotFoundError:
            continue
        if not dry_run:
            _remove(root, Path(entry.path))
        out.append((Path(entry.path), size))
    return out


def _is_hex(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _freed_bytes(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_size
    return total


def _remove(root: Path, folder: Path) -> None:
    """Out of sight in one rename, then deleted (its files are read-only; the folder is
    not, so they can be unlinked)."""
    aside = root / f"{_TMP}rm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
