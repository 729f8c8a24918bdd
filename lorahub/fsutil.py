"""Durable file-system steps shared by the blob store, export and merge."""

from __future__ import annotations

import errno
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
    """Rename a finished directory to ``out``. With ``replace`` an existing ``out`` is
    swapped with it in one step where Linux allows, else moved aside first; the old tree is
    deleted only once the new one is in. Raises ``OSError`` (the old tree restored) if the
    rename fails."""
    old = None
    if replace and os.path.isdir(out) and not os.path.islink(out) and _exchange(tmp, out):
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old tree
        return
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
