"""Writing a merged checkpoint folder that transformers can load, atomically.

A merged checkpoint is mostly the base's own bytes, so the merge is an I/O job. The output is
written through two page-aligned staging buffers with ``O_DIRECT`` where the filesystem has it:
no copy into the page cache, no kernel writeback work, no eviction of the base from the cache.
Memory stays bounded by the largest merged tensor (plus the adapters), and the output directory
appears at its final path only when every file in it is complete and synced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..aliases import Progress
from ..dtypes import FLOAT_DTYPES, TORCH_NAMES
from ..errors import LorahubError, MergeIOError, MergeOutputConflict
from ..fsutil import fsync_dir, process_alive, publish_dir
from ..outputs import FILES_KEY, MARKER, MERGE_CARD, Input, check_output
from ..units import human_size
from .plan import DEFAULT_MAX_SHARD_SIZE, MergePlan, one_file, plan_merge, resolve_device
from .source import Copy, Sources
from .stream import stream_merged

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..base import BaseModel

log = logging.getLogger(__name__)
_COPY_CHUNK = 1 << 20  # bytes per read when copying a file of the base folder
_MAX_CONFIG_BYTES = 16 << 20  # a larger config.json is copied as is, its dtype not rewritten

SPACE_MARGIN = 64 * 1024**2
ALIGN = 4096  # direct I/O block: a multiple of every disk's logical block size
STAGING = 32 << 20


@dataclass(frozen=True)
class MergeResult:
    """A finished merge: where it is and what it took."""

    path: Path
    tensors: int
    merged: int
    bytes_written: int
    seconds: float
    device: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the path as a string)."""
        return {
            "path": str(self.path),
            "tensors": self.tensors,
            "merged": self.merged,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "device": self.device,
            "dtype": self.dtype,
        }


def merge_to_dir(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    out: Path,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: Progress | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    inputs: Iterable[Input] = (),
) -> MergeResult:
    """Merge adapters into the base and write a checkpoint directory transformers can load.

    The output holds safetensors shards named as the base's (``model.safetensors``, or
    ``model-0000k-of-0000n`` plus ``model.safetensors.index.json``; a diffusers folder's
    ``diffusion_pytorch_model...``), every other file of the base folder but weights (configs,
    tokenizer files, ``*.py`` for ``trust_remote_code``: :func:`lorahub.outputs.merge_aux_files`),
    a ``README.md`` model card (``base_model_relation: merge``, the inputs), and
    ``lorahub.json`` describing the merge (``extra_metadata`` keys are added at its top level,
    e.g. ``base_content_hash`` and ``adapters`` digests). It is written to a temporary
    directory beside ``out``, synced, then renamed into place: an interrupted merge never
    leaves a directory at ``out``.

    Args:
        out: the directory to create.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...
        force: replace an existing ``out`` (atomically swapped, then the old one deleted),
            only if it is an earlier lorahub output holding nothing else (see
            :func:`lorahub.outputs.check_output`); an empty folder is filled without it.
        progress: called as ``progress(bytes_done, bytes_total)`` of tensor data.
        inputs: ``(what, path)`` of more inputs ``out`` must not be or hold (adapter folders);
            the base's folder is always one.

    Raises:
        IncompatibleAdapter: an adapter does not fit the base; nothing is written.
        InvalidMergeArgument: bad weights, dtype, shard size or device.
        MergeOutputConflict: ``out`` exists (without ``force``), or is not lorahub's to
            replace (a link, the current directory, an input, a folder with other files);
            ``.target`` is ``out``.
        MergeIOError: too little free disk space, a truncated or unreadable base shard, a
            write or a move that failed.
        IncompatibleMerge: two adapters replacing one tensor, or a base tensor not float.
        MergeBaseNotFound: a base without local files.
        MergeError: all of these are.

    Example::

        merge_to_dir(base, [a, b], [1.0, 0.5], out=Path("blend"), dtype="bf16")
    """
    start = time.perf_counter()
    out = Path(out).absolute()
    plan = plan_merge(base, adapters, weights, dtype=dtype, max_shard_size=max_shard_size)
    dev = resolve_device(device)
    inputs = [*inputs, *([("the base model", base.root)] if base.root is not None else [])]
    check_output(out, force=force, inputs=inputs, kind="merge")
    with _io_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        free = shutil.disk_usage(out.parent).free
    if free < plan.output_bytes + SPACE_MARGIN:
        raise MergeIOError(
            f"not enough free space in {out.parent}: the merge needs about "
            f"{human_size(plan.output_bytes + SPACE_MARGIN)}, {human_size(free)} is free"
        )
    with Sources(base, plan) as sources, _io_errors(out):
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            written = _write_checkpoint(tmp, plan, adapters, sources, dev, progress)
            doc = merge_record(base, plan, adapters, dev, extra_metadata)
            written += _write_file(tmp / MERGE_CARD, merged_card_text(base, plan, doc).encode())
            written += _write_file(tmp / MARKER, json.dumps(doc, indent=2).encode())
            fsync_dir(tmp)
            # Checked again: during a long merge someone may have put files at ``out``.
            replace = check_output(out, force=force, inputs=inputs, kind="merge")
            _publish(tmp, out, replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.perf_counter() - start
    log.info(
        "merged %d adapter(s) into %s in %.1fs (%s)", len(adapters), out, seconds, plan.summary
    )
    return MergeResult(
        path=out,
        tensors=len(plan.tensors),
        merged=plan.merged,
        bytes_written=written,
        seconds=seconds,
        device=str(dev),
        dtype=_result_dtype(plan),
    )


@contextlib.contextmanager
def _io_errors(out: Path) -> Iterator[None]:
    """An OSError while making ``out`` (no permission, a full disk, a file in the way)
    becomes a MergeIOError saying so; the caller has already removed its partial output."""
    try:
        yield
    except LorahubError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergeIOError(
                f"the disk under {out.parent} filled up during the merge; nothing was left at {out}"
            ) from exc
        where = f" ({exc.filename})" if exc.filename else ""
        raise MergeIOError(f"cannot merge to {out}: {exc.strerror or exc}{where}") from exc


def _write_checkpoint(
    tmp: Path,
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: Sources,
    dev: torch.device,
    progress: Progress | None,
) -> int:
    total, done = plan.data_bytes, 0
    capacity = max([STAGING] + [tp.nbytes + ALIGN for tp in plan.tensors if not tp.copied])
    current: list[_ShardFile] = []
    written = 0
    stream = stream_merged(plan, adapters, sources, dev, lambda tp: current[0].reserve(tp.nbytes))
    with contextlib.closing(stream) as items:
        for shard in plan.shards:
            with _ShardFile(tmp / shard.name, capacity) as f:
                current[:] = [f]
                f.write(struct.pack("<Q", len(shard.header)) + shard.header)
                for tp in plan.tensors[shard.first : shard.first + shard.count]:
                    item = next(items)
                    if isinstance(item, Copy):
                        for piece in sources.pieces(item):
                            f.write(piece)
                    elif item is None:
                        f.commit(tp.nbytes)
                    else:
                        f.write(item)
                    done += tp.nbytes
                    if progress is not None:
                        progress(done, total)
                written += f.finish(shard.file_bytes)
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.data_bytes},
            "weight_map": {tp.name: plan.shards[tp.shard].name for tp in plan.tensors},
        }
        written += _write_file(tmp / plan.index_name, json.dumps(index, indent=2).encode())
    for name in plan.aux_files:
        written += _copy_aux(sources.root / name, tmp / name, plan.dtype)
    return written


class _ShardFile:
    """An output file written front to back through two page-aligned staging buffers: the
    merge fills one while a helper thread writes the other out.

    Where the filesystem allows it the file is opened with ``O_DIRECT``, so the bytes go from
    the staging buffer to the disk without a copy into the page cache and without the kernel's
    writeback work (on a small machine, that was most of the CPU a merge took) and without
    evicting the base from the cache. Direct writes must be whole blocks: each write stops at
    a multiple of ``ALIGN``, the rest moves to the other buffer, the last block is padded and
    the file truncated to its size.
    """

    def __init__(self, path: Path, capacity: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct = _set_direct(self.fd, True)
        self.capacity = capacity + (-capacity % ALIGN)
        self.bufs = [mmap.mmap(-1, self.capacity) for _ in range(2)]  # page-aligned
        self.views = [memoryview(b) for b in self.bufs]
        self.writes: list[Any] = [None, None]
        self.cur = self.fill = self.flushed = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lorahub-write")

    def __enter__(self) -> _ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        self.writes = [None, None]
        os.close(self.fd)
        for v, b in zip(self.views, self.bufs, strict=True):
            with contextlib.suppress(BufferError):  # a failed write's traceback holds a view
                v.release()
                b.close()

    def reserve(self, n: int) -> memoryview:
        """The next ``n`` bytes of the file, to fill in place and then :meth:`commit`."""
        if self.fill + n > self.capacity:
            self._switch()
        return self.views[self.cur][self.fill : self.fill + n]

    def commit(self, n: int) -> None:
        self.fill += n

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while data:
            if self.fill == self.capacity:
                self._switch()
            n = min(len(data), self.capacity - self.fill)
            self.views[self.cur][self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]

    def finish(self, expected: int) -> int:
        """Write what is left, check the size, and sync; returns the file's size."""
        size = self.flushed + self.fill
        pad = -self.fill % ALIGN if self.direct else 0
        self.views[self.cur][self.fill : self.fill + pad] = bytes(pad)
        self._submit(self.cur, self.fill + pad)
        for w in self.writes:
            if w is not None:
                w.result()
        if pad:
            os.ftruncate(self.fd, size)
        if size != expected or os.fstat(self.fd).st_size != expected:
            raise MergeIOError(f"wrote {size} bytes to {self.path.name}, expected {expected}")
        os.fsync(self.fd)
        return size

    def _switch(self) -> None:
        cut = self.fill - self.fill % ALIGN if self.direct else self.fill
        old, new = self.cur, 1 - self.cur
        self._submit(old, cut)
        if self.writes[new] is not None:
            self.writes[new].result()
        tail = self.fill - cut
        self.views[new][:tail] = self.views[old][cut : self.fill]
        self.cur, self.fill = new, tail

    def _submit(self, buf: int, n: int) -> None:
        self.writes[buf] = self.pool.submit(self._pwrite, self.views[buf][:n], self.flushed)
        self.flushed += n

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while data:
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                # The filesystem took O_DIRECT but refuses this write: go on buffered, once.
                self.direct = False
                _set_direct(self.fd, False)
                continue
            data, offset = data[n:], offset + n


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False where the OS or filesystem lacks it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def _copy_aux(src: Path, dst: Path, dtype: str | None) -> int:
    """Copy a file of the base folder, streamed (a large stray file is never held in memory);
    the config's dtype follows a changed output dtype."""
    with open(src, "rb") as f:
        if dtype and src.name == "config.json":
            data = f.read(_MAX_CONFIG_BYTES + 1)
            if len(data) <= _MAX_CONFIG_BYTES:
                return _write_file(dst, _retyped(data, dtype))
            log.warning("%s is over %s: copied as is", src, human_size(_MAX_CONFIG_BYTES))
            f.seek(0)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, _COPY_CHUNK)
            out.flush()
            os.fsync(fd)
            return out.tell()


def _retyped(config_json: bytes, dtype: str) -> bytes:
    """``config.json``'s bytes with its dtype set to ``dtype``; unchanged if not a JSON object."""
    with contextlib.suppress(ValueError, RecursionError):
        config = json.loads(config_json)
        if isinstance(config, dict):
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = TORCH_NAMES[dtype]
            return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return config_json


def merge_record(
    base: BaseModel,
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    dev: torch.device,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "lorahub_version": __version__,
        "base": {
            "source": base.source,
            "repo_id": base.repo_id,
            "revision": base.revision,
            "signature": str(base.signature),
        },
        "adapters": [
            {"weight": w, "modules": len(a.modules), "replaced": sorted(a.full)}
            for a, w in zip(adapters, plan.weights, strict=True)
        ],
        "weights": list(plan.weights),
        "dtype": _result_dtype(plan),
        "device": dev.type,
        "tensors": len(plan.tensors),
        "merged": plan.merged,
    }
    doc.update(extra or {})
    # What this merge writes, so a later --force knows the folder holds nothing else.
    files = [s.name for s in plan.shards] + ([plan.index_name] if len(plan.shards) > 1 else [])
    doc[FILES_KEY] = sorted([*files, *plan.aux_files, MERGE_CARD, MARKER])
    return doc


def merged_card_text(base: BaseModel, plan: MergePlan, doc: Mapping[str, Any]) -> str:
    """The merged checkpoint's model card, from the base's card and config and the inputs
    ``doc`` (this merge's ``lorahub.json``) records."""
    from ..card import README, merged_card, read_card

    config: dict[str, Any] | None = None
    card = None
    if base.root is not None:
        if not one_file(base):  # a lone file's folder may hold another model's card
            card = read_card(base.root / README)
        with contextlib.suppress(OSError, ValueError, RecursionError):
            loaded = json.loads((base.root / "config.json").read_bytes())
            config = loaded if isinstance(loaded, dict) else None
    inputs = doc.get("adapters")
    return merged_card(
        base_repo_id=base.repo_id,
        base_revision=base.revision,
        base_card=card,
        base_config=config,
        adapters=[a for a in inputs if isinstance(a, dict)] if isinstance(inputs, list) else [],
        weights=plan.weights,
        dtype=str(doc.get("dtype")),
    )


def _result_dtype(plan: MergePlan) -> str:
    """The requested dtype, else the float dtype holding most of the output's bytes."""
    if plan.dtype:
        return plan.dtype
    sizes: dict[str, int] = {}
    for tp in plan.tensors:
        sizes[tp.dtype] = sizes.get(tp.dtype, 0) + tp.nbytes
    floats = {k: v for k, v in sizes.items() if k in FLOAT_DTYPES} or sizes
    return max(floats, key=floats.__getitem__) if floats else "F32"


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    try:
        publish_dir(tmp, out, replace=replace)
    except FileExistsError as e:
        # Something appeared at ``out`` after the last check: a conflict, not a disk error.
        raise MergeOutputConflict(
            f"cannot move the merged checkpoint to {out}: {e.strerror}; nothing was replaced",
            target=out,
        ) from e
    except OSError as e:
        raise MergeIOError(f"cannot move the merged checkpoint to {out}: {e.strerror}") from e


_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _remove_stale(out: Path) -> None:
    """Delete leftovers of merges to ``out`` whose process is gone (killed mid-merge)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            m = _STALE_RE.match(entry.name)
            if m and m.group("name") == out.name and not process_alive(int(m.group("pid"))):
                log.info("removing %s, left by an interrupted merge", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
