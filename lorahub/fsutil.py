"""Durable file-system steps shared by the blob store, export and merge."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True, mode: int = 0o666) -> None:
    """Replace the file at ``path`` with ``data`` in one step: a reader sees the old bytes or
    the new ones, never a part, even across a crash.

    The bytes go to a unique temp file in the same folder (same filesystem, so the rename is
    atomic), are fsynced, then renamed over ``path``, and the folder is fsynced so the rename
    survives a power cut. The temp file is made with ``mode`` less the umask (0o666: as
    ``open(path, "wb")`` would; 0o600 for a file only its owner should read) and removed on
    any failure. ``sync=False`` skips both fsyncs, for a cache whose loss only costs a
    recomputation.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full (``path`` is
            then unchanged).
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    OS, the C library or the filesystem cannot, so the caller falls back to two renames."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # EPERM: seccomp
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, out: Path, replace: bool) -> None:
    """Rename a finished directory to ``out``. With ``replace`` an existing directory at
    ``out`` is swapped with it in one step where Linux allows, else moved aside first; the old
    tree is deleted only once the new one is in. A symbolic link or a file at ``out`` is never
    replaced, moved or followed. Raises ``OSError`` (the old tree restored) if the rename
    fails, ``FileExistsError`` for a link or file in the way."""
    _refuse_non_dir(out)
    if replace and _is_real_dir(out) and _exchange(tmp, out):
        if os.path.islink(tmp):  # a link took the folder's place after the check: undo
            _exchange(tmp, out)
            _refuse_non_dir(out)
        fsync_dir(out.parent)
        _remove_tree(tmp)  # tmp now holds the old tree
        return
    old = None
    if replace and os.path.lexists(out):
        _refuse_non_dir(out)
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        if not _is_real_dir(old):  # swapped for a link or file after the check: put it back
            os.rename(old, out)
            _refuse_non_dir(out)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        _remove_tree(old)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _refuse_non_dir(out: Path) -> None:
    """Raise ``FileExistsError`` when something other than a real directory is at ``out``."""
    if os.path.lexists(out) and not _is_real_dir(out):
        what = "a symbolic link" if os.path.islink(out) else "not a directory"
        raise FileExistsError(errno.EEXIST, f"{what} is in the way; it was left as it is", str(out))


def _remove_tree(path: Path) -> None:
    """Delete a replaced tree; what cannot be deleted is logged, not raised: the new output
    is already in place."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not delete all of %s, left from a replaced output", path)


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), since
    setting it to read it races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (someone else's counts): a leftover named after
    a live writer's pid is still being written."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
