"""Reading the base: its shards opened and checked once, their tensors' bytes served by memory
map (CPU merge, raw copies) or ``pread`` (CUDA pipeline, :func:`~lorahub.merge.iter_merged`)."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MergeBaseNotFound, MergeIOError

if TYPE_CHECKING:
    import torch

    from ..base import BaseModel, TensorInfo
    from .plan import MergePlan, TensorPlan


@dataclass(frozen=True)
class Copy:
    """Copy these bytes of a base file to the output as they are."""

    file: str
    offset: int
    size: int


class Sources:
    """Open base shards, checked up front to hold every byte their headers promise.

    The CPU path and the copies read through a private memory map, unmapping each tensor
    when done so the RSS stays small; the CUDA path and :func:`iter_merged` read with
    ``pread``. A shard truncated *during* a merge (after the check) gives a MergeIOError on the
    second and a SIGBUS on the first; either way nothing appears at the output path.
    """

    def __init__(self, base: BaseModel, plan: MergePlan) -> None:
        if base.root is None:
            raise MergeBaseNotFound(
                f"base {base.source!r} has no local files; download it first "
                f"(hf download {base.repo_id or base.source})"
            )
        self.root = base.root
        self.plan = plan
        self.fds: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def __enter__(self) -> Sources:
        need: dict[str, int] = {}
        for tp in self.plan.tensors:
            file, (_, end) = _located(tp.source)
            need[file] = max(need.get(file, 0), end)
        try:
            for name, end in need.items():
                self._open(name, end)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, name: str, end: int) -> None:
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise MergeIOError(f"cannot open base shard {path}: {e.strerror}") from e
        self.fds[name] = fd
        head = os.pread(fd, 8, 0)
        size = os.fstat(fd).st_size
        start = 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else size + 1
        if size < start + end:
            raise MergeIOError(
                f"base shard {path} is truncated: its header needs {start + end} bytes but the "
                f"file has {size}; download it again"
            )
        self.starts[name] = start

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for m in self.maps.values():
            with contextlib.suppress(BufferError):  # a caller still holds a view: GC unmaps it
                m.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.maps.clear()

    def _map(self, file: str) -> mmap.mmap:
        # Private and writable only so torch takes it without a warning; nothing writes to it.
        m = self.maps.get(file)
        if m is None:
            m = self.maps[file] = mmap.mmap(self.fds[file], 0, access=mmap.ACCESS_COPY)
        return m

    def mapped(self, tp: TensorPlan) -> torch.Tensor:
        """The tensor's bytes in the page cache, as a uint8 tensor: no copy."""
        import torch

        file, (begin, _) = _located(tp.source)
        offset = self.starts[file] + begin
        m = self._map(file)
        return torch.frombuffer(m, dtype=torch.uint8, count=tp.source_nbytes, offset=offset)

    def pieces(self, item: Copy, size: int = 16 << 20) -> Iterator[memoryview]:
        """The bytes of ``item``, a piece at a time, each unmapped once the caller is done."""
        with memoryview(self._map(item.file)) as view:
            for start in range(item.offset, item.offset + item.size, size):
                n = min(size, item.offset + item.size - start)
                with view[start : start + n] as piece:
                    yield piece
                self.unmap(item.file, start - self.starts[item.file], n)

    def unmap(self, file: str, offset: int, size: int) -> None:
        """Drop data bytes ``[offset, offset + size)`` from this process (not from the page
        cache), so the RSS does not grow with the model. Pages still in use fault back in."""
        m = self.maps.get(file)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = self.starts[file] + offset
            aligned = start - start % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, aligned, start + size - aligned)

    def unmap_tensor(self, tp: TensorPlan) -> None:
        """:meth:`unmap` the base bytes of ``tp``."""
        file, (begin, _) = _located(tp.source)
        self.unmap(file, begin, tp.source_nbytes)

    def copy_of(self, tp: TensorPlan) -> Copy:
        file, (begin, _) = _located(tp.source)
        return Copy(file, self.starts[file] + begin, tp.source_nbytes)

    def read_tensor(self, tp: TensorPlan, view: memoryview) -> None:
        file, (begin, _) = _located(tp.source)
        self.read_into(file, self.starts[file] + begin, view)

    def read_into(self, file: str, pos: int, view: memoryview) -> None:
        """Fill ``view`` from ``file`` at byte ``pos``; a short file is a :class:`MergeIOError`."""
        fd, done = self.fds[file], 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise MergeIOError(f"base shard {self.root / file} ended early; download it again")
            done += n


def _located(info: TensorInfo) -> tuple[str, tuple[int, int]]:
    """The base file of a tensor and its data offsets; a table read from the catalog has
    neither."""
    if info.file is None or info.offsets is None:
        raise MergeBaseNotFound(f"base tensor {info.name!r} has no local file; download the base")
    return info.file, info.offsets
