"""Streaming merge of one or more LoRA adapters into a base checkpoint.

A merged checkpoint is mostly the base's own bytes, so the merge is an I/O job. The base is
read through a memory map (no copy out of the page cache); tensors no adapter touches are
copied through as raw bytes, never decoded; the others are merged one at a time, in float32
on the chosen device, and cast once to the output dtype. The output is written through two
page-aligned staging buffers with ``O_DIRECT`` where the filesystem has it: no copy into the
page cache, no kernel writeback work, no eviction of the base from the cache. Memory stays
bounded by the largest merged tensor (plus the adapters), and the output directory appears
at its final path only when every file in it is complete and synced.

Math, per base weight ``W`` and adapter ``i`` with user weight ``w_i`` (PEFT's ``merge``)::

    W <- adapter.full[W]                       if an adapter replaces the tensor
    W <- W + w_i * s_i * delta_i               plain LoRA, one adapter after another
    W <- (m_i / ||W0 + w_i s_i delta_i||) * (W + w_i s_i delta_i)     DoRA

``W0`` is the weight before any adapter (after a replacement): PEFT takes the DoRA norm of the
unmerged weight even when earlier adapters are merged already, and so do we. The norm is per
output feature: rows of ``[out, in]`` weights (Linear, conv), columns of weights stored
``[in, out]`` (Conv1D with ``fan_in_fan_out``, embeddings). A LoRA bias adds ``w_i s_i b_i``
to the base bias. ``w_i`` multiplies the scaling, as PEFT's ``set_scale`` does.

Example::

    base = open_base("meta-llama/Llama-3.2-1B")
    result = merge_to_dir(base, [adapter], out=Path("merged"), dtype="bf16")
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import compat
from .base import DTYPE_BITS, FLOAT_DTYPES
from .errors import LorahubError, MergeError
from .fsutil import fsync_dir, process_alive, publish_dir
from .outputs import FILES_KEY, Input, check_output
from .units import human_size

if TYPE_CHECKING:
    import torch

    from .adapter import LoraAdapter, LoraModule
    from .base import BaseModel, TensorInfo
    from .compat import CompatReport

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
SPACE_MARGIN = 64 * 1024**2
INDEX_NAME = "model.safetensors.index.json"
METADATA_NAME = "lorahub.json"

# Files a loader needs next to the weights; copied from the base root when present.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)

_DTYPE_ALIASES = {
    "f64": "F64", "fp64": "F64", "float64": "F64", "double": "F64",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}  # fmt: skip
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
# Row chunk of the CPU kernel, in float32 elements: small enough to stay in cache between the
# bf16->f32 read, the rank-r update and the f32->bf16 write.
CPU_CHUNK = 1 << 20
ALIGN = 4096  # direct I/O block: a multiple of every disk's logical block size
STAGING = 32 << 20


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Touch:
    """One adapter module's contribution to one base tensor (its weight, or its bias)."""

    adapter: int
    module: str
    part: str  # "weight" or "bias"
    weight: float


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from, what changes it, and where it goes."""

    name: str
    source: TensorInfo
    dtype: str
    shard: int
    offsets: tuple[int, int]
    replaced_by: tuple[int, str] | None = None
    touches: tuple[Touch, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def source_nbytes(self) -> int:
        start, end = self.source.offsets or (0, 0)
        return end - start

    @property
    def merged(self) -> bool:
        """Changed by an adapter (replaced or updated)."""
        return self.replaced_by is not None or bool(self.touches)

    @property
    def copied(self) -> bool:
        """Written as the base's bytes, without being decoded (an empty tensor has none to
        decode, whatever its dtype becomes)."""
        return not self.merged and (self.dtype == self.source.dtype or self.source_nbytes == 0)


@dataclass(frozen=True)
class ShardPlan:
    """One output safetensors file; ``header`` is its exact JSON header, padded."""

    name: str
    first: int
    count: int
    data_bytes: int
    header: bytes = field(repr=False)

    @property
    def file_bytes(self) -> int:
        return 8 + len(self.header) + self.data_bytes


@dataclass(frozen=True)
class MergePlan:
    """What a merge will do, decided before anything is written.

    ``tensors`` are in the order they lie in the base files (sequential reads), which is
    also the order they are written and yielded by :func:`iter_merged`.
    """

    tensors: tuple[TensorPlan, ...] = field(repr=False)
    shards: tuple[ShardPlan, ...]
    weights: tuple[float, ...]
    reports: tuple[CompatReport, ...] = field(repr=False)
    dtype: str | None
    aux_files: tuple[str, ...]
    aux_bytes: int

    @property
    def merged(self) -> int:
        return sum(t.merged for t in self.tensors)

    @property
    def copied(self) -> int:
        return sum(t.copied for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def output_bytes(self) -> int:
        """Bytes the output directory will take (shards, index, copied files), roughly."""
        index = 64 * len(self.tensors) + 256 if len(self.shards) > 1 else 0
        return sum(s.file_bytes for s in self.shards) + index + self.aux_bytes + 4096

    @property
    def summary(self) -> str:
        gb = self.output_bytes / 1e9
        return (
            f"{self.merged} of {len(self.tensors)} tensors merged, {self.copied} copied as is; "
            f"{len(self.shards)} shard(s), {gb:.2f} GB"
        )


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


def plan_merge(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> MergePlan:
    """Check every adapter against the base and decide the output, without writing anything.

    Args:
        base: the base checkpoint (from :func:`lorahub.base.open_base`).
        adapters: adapters to merge, applied in this order.
        weights: one multiplier per adapter (default 1.0 each); it scales the adapter's delta.
        dtype: output dtype of float tensors (``"bf16"``, ``"float16"``, ``"F32"``...);
            ``None`` keeps each tensor's base dtype.
        max_shard_size: most data bytes per output file.

    Raises:
        IncompatibleAdapter: an adapter does not fit the base (raised by ``compat.require``).
        MergeError: bad weights, dtype or shard size, or two adapters replacing one tensor.
    """
    if not adapters:
        raise MergeError("nothing to merge: give at least one adapter")
    try:
        weights = tuple(
            float(w) for w in (weights if weights is not None else [1.0] * len(adapters))
        )
    except (TypeError, ValueError):
        raise MergeError(f"weights must be numbers, got {list(weights or [])!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite numbers, got {list(weights)}")
    if len(weights) != len(adapters):
        raise MergeError(f"got {len(weights)} weights for {len(adapters)} adapters; give one each")
    out_dtype = normalize_dtype(dtype)
    if max_shard_size <= 0:
        raise MergeError(f"max_shard_size must be positive, got {max_shard_size}")

    touches, replaced, reports = _collect(base, adapters, weights)
    plans, shards = _layout(base, touches, replaced, out_dtype, max_shard_size)
    aux = tuple(a for a in AUX_FILES if base.root is not None and (base.root / a).is_file())
    aux_bytes = sum((base.root / a).stat().st_size for a in aux) if base.root else 0
    return MergePlan(plans, shards, weights, reports, out_dtype, aux, aux_bytes)


def _collect(
    base: BaseModel, adapters: Sequence[LoraAdapter], weights: Sequence[float]
) -> tuple[dict[str, list[Touch]], dict[str, tuple[int, str]], tuple[CompatReport, ...]]:
    """Which base tensors each adapter touches or replaces, after checking it fits."""
    touches: dict[str, list[Touch]] = {}
    replaced: dict[str, tuple[int, str]] = {}
    reports = []
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        what = f"adapter {i + 1} of {len(adapters)}"
        report = compat.check(adapter, base.tensors)
        compat.require(report, f"merge {what} into {base.source}")
        reports.append(report)
        for key, target in report.full_mapping.items():
            if target in replaced:
                raise MergeError(
                    f"adapters {replaced[target][0] + 1} and {i + 1} both replace {target!r} "
                    "(modules_to_save); merge them in separate steps or leave one out"
                )
            replaced[target] = (i, key)
        # compat.require has checked shapes, DoRA magnitudes and that LoRA biases have a base bias.
        for name, module in adapter.modules.items():
            target = report.mapping[name]
            touches.setdefault(target, []).append(Touch(i, name, "weight", w))
            if module.bias is not None:
                bias = target.removesuffix("weight") + "bias"
                touches.setdefault(bias, []).append(Touch(i, name, "bias", w))
    for name in [*touches, *replaced]:
        if base.tensors[name].dtype not in FLOAT_DTYPES:
            raise MergeError(
                f"base tensor {name!r} has dtype {base.tensors[name].dtype}; "
                f"lorahub merges into {', '.join(sorted(FLOAT_DTYPES))} weights only"
            )
    return touches, replaced, tuple(reports)


def _layout(
    base: BaseModel,
    touches: Mapping[str, list[Touch]],
    replaced: Mapping[str, tuple[int, str]],
    out_dtype: str | None,
    max_shard_size: int,
) -> tuple[tuple[TensorPlan, ...], tuple[ShardPlan, ...]]:
    """Output tensors in the order they lie in the base files, packed greedily into shards."""
    file_index = {name: k for k, name in enumerate(base.files)}
    infos = sorted(
        base.tensors.values(),
        key=lambda t: (file_index.get(t.file, len(file_index)), (t.offsets or (0,))[0], t.name),
    )
    plans: list[TensorPlan] = []
    bounds: list[tuple[int, int, int]] = []  # (first tensor, count, data bytes) per shard
    first, size = 0, 0
    for info in infos:
        dtype = out_dtype if out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
        nbytes = info.nbytes if dtype == info.dtype else info.numel * DTYPE_BITS[dtype] // 8
        if size and size + nbytes > max_shard_size:
            bounds.append((first, len(plans) - first, size))
            first, size = len(plans), 0
        plans.append(
            TensorPlan(
                name=info.name,
                source=info,
                dtype=dtype,
                shard=len(bounds),
                offsets=(size, size + nbytes),
                replaced_by=replaced.get(info.name),
                touches=tuple(touches.get(info.name, ())),
            )
        )
        size += nbytes
    bounds.append((first, len(plans) - first, size))
    names = _shard_names(len(bounds))
    shards = tuple(
        ShardPlan(names[k], f, c, b, _header(plans[f : f + c]))
        for k, (f, c, b) in enumerate(bounds)
    )
    return tuple(plans), shards


def _columnwise(adapter: LoraAdapter, module: LoraModule) -> bool:
    """Whether the base stores this module's weight ``[in, out]`` (output features are columns)."""
    from .adapter import EMBEDDING, LINEAR

    return module.kind == EMBEDDING or (adapter.fan_in_fan_out and module.kind == LINEAR)


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _header(plans: Sequence[TensorPlan]) -> bytes:
    doc: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for tp in plans:
        doc[tp.name] = {
            "dtype": tp.dtype,
            "shape": list(tp.shape),
            "data_offsets": list(tp.offsets),
        }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    # Pad to 8 bytes so the data section (and so every tensor in it) stays aligned.
    return raw + b" " * (-len(raw) % 8)


# ---------------------------------------------------------------------------------------------
# Small public helpers


def normalize_dtype(dtype: str | None) -> str | None:
    """The safetensors code (``"BF16"``) of a user's spelling (``bf16``, ``torch.float16``)."""
    if dtype is None:
        return None
    text = str(dtype).strip().removeprefix("torch.")
    if text.upper() in FLOAT_DTYPES:
        return text.upper()
    code = _DTYPE_ALIASES.get(text.lower())
    if code is None:
        raise MergeError(f"unknown output dtype {dtype!r}; use bf16, fp16, fp32 or fp64")
    return code


def parse_size(text: str | int) -> int:
    """Bytes from a size like ``"5GB"`` (10^9), ``"2GiB"`` (2^30), ``"500MB"`` or ``"1024"``.

    Raises:
        MergeError: not a positive size with a known unit.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise MergeError(
                f"not a size: {text!r}; write a number with a unit, e.g. 5GB, 500MB or 2GiB"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise MergeError(f"size must be positive, got {text!r}")
    return size


def resolve_device(device: str) -> torch.device:
    """The torch device to merge on: ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        MergeError: an unknown device, or CUDA asked for where torch has none.
    """
    import torch

    text = (device or "auto").strip()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise MergeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"device {device!r} asked for, but torch sees no CUDA GPU; use cpu")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise MergeError(
                f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise MergeError(f"lorahub merges on cpu or cuda, not {device!r}")
    return dev


# ---------------------------------------------------------------------------------------------
# Merging tensors


def iter_merged(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged model, one at a time.

    Tensors are CPU tensors the caller owns, in the order they lie in the base files; only
    the one being yielded (and the small look-ahead of the device pipeline) is in memory,
    so this suits loaders that take a state dict piece by piece.

    Raises:
        IncompatibleAdapter, MergeError: as :func:`plan_merge`, before the first tensor.
    """
    import torch

    plan = plan_merge(base, adapters, weights, dtype=dtype)
    dev = resolve_device(device)
    fresh: list[torch.Tensor] = []

    def reserve(tp: TensorPlan) -> memoryview:
        fresh[:] = [torch.empty(tp.nbytes, dtype=torch.uint8)]
        return memoryview(fresh[0].numpy())

    with _Sources(base, plan) as sources:
        stream = _stream(plan, adapters, sources, dev, reserve)
        with contextlib.closing(stream) as items:
            for tp, item in zip(plan.tensors, items, strict=True):
                if item is None:
                    raw = fresh.pop()
                else:
                    raw = torch.empty(tp.nbytes, dtype=torch.uint8)
                    if isinstance(item, _Copy):
                        sources.read_into(item.file, item.offset, memoryview(raw.numpy()))
                    else:
                        raw.numpy()[:] = item
                yield tp.name, raw.view(_torch_dtype(tp.dtype)).reshape(tp.shape)


@dataclass(frozen=True)
class _Copy:
    """Copy these bytes of a base file to the output as they are."""

    file: str
    offset: int
    size: int


@dataclass
class _Op:
    """One touch, ready on the device: ``W2d += alpha * left @ right`` (or a bias add)."""

    alpha: float
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    columnwise: bool = False


def _prepare_ops(
    plan: MergePlan, adapters: Sequence[LoraAdapter], dev: torch.device
) -> dict[str, list[_Op]]:
    """Adapter factors in float32 on the device, laid out so every update is one ``addmm``."""

    ops: dict[str, list[_Op]] = {}
    for tp in plan.tensors:
        for t in tp.touches:
            adapter = adapters[t.adapter]
            m = adapter.modules[t.module]
            alpha = t.weight * m.scaling(adapter.use_rslora)
            f32 = {"device": dev, "dtype": _compute_dtype(tp)}
            if t.part == "bias":
                ops.setdefault(tp.name, []).append(_Op(alpha, bias=m.bias.to(**f32)))
                continue
            a = m.A.to(**f32).reshape(m.rank, -1)
            b = m.B.to(**f32).reshape(-1, m.rank)
            columnwise = _columnwise(adapter, m)
            # [in, out] storage takes delta.T = A.T @ B.T; [out, ...] storage takes B @ A.
            left, right = (a.T.contiguous(), b.T.contiguous()) if columnwise else (b, a)
            mag = m.magnitude.to(**f32).reshape(-1) if m.magnitude is not None else None
            ops.setdefault(tp.name, []).append(_Op(alpha, left, right, None, mag, columnwise))
    return ops


def _compute_dtype(tp: TensorPlan) -> torch.dtype:
    """float32, or float64 where the base or the output is float64."""
    import torch

    return torch.float64 if "F64" in (tp.source.dtype, tp.dtype) else torch.float32


_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
}  # fmt: skip


def _torch_dtype(code: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, _TORCH_DTYPES.get(code, ""), None)
    if dtype is None:
        raise MergeError(f"dtype {code} is not supported by this version of torch")
    return dtype


class _Scratch:
    """A growable float buffer, so the kernel allocates once per merge, not once per tensor."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buf: dict[Any, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        import torch

        t = self.buf.get((slot, dtype))
        if t is None or t.numel() < n:
            t = self.buf[(slot, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return t[:n]


def _blocks(tp: TensorPlan, ops: Sequence[_Op], chunk: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk`` elements; one range when a DoRA norm runs down columns."""
    rows, cols = _matrix(tp)
    whole = any(op.magnitude is not None and op.columnwise for op in ops)
    step = rows if whole else max(1, chunk // cols)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _matrix(tp: TensorPlan) -> tuple[int, int]:
    """The 2-D view every update works on: ``[out, in...]`` weights as they are, vectors as
    one row."""
    rows = tp.shape[0] if len(tp.shape) > 1 else 1
    return rows, max(1, tp.source.numel // max(rows, 1))


def _merge_rows(
    tp: TensorPlan,
    first: torch.Tensor,
    out: torch.Tensor,
    ops: Sequence[_Op],
    rows: tuple[int, int],
    scratch: _Scratch,
) -> None:
    """Rows ``r0:r1`` of the merged tensor: ``first`` (base or replacement, any dtype, 2-D)
    in, ``out`` (output dtype, 2-D) out, computed in a float32 scratch block.

    On the CPU a block is small enough to stay in cache from the widening read through the
    rank-r updates to the narrowing write.
    """

    r0, r1 = rows
    acc = scratch.get((r1 - r0) * first.shape[1], _compute_dtype(tp)).view(r1 - r0, -1)
    acc.copy_(first[r0:r1])
    for k, op in enumerate(ops):
        if op.bias is not None:
            acc.add_(op.bias.view(1, -1), alpha=op.alpha)
        elif op.magnitude is None:
            acc.addmm_(op.left[r0:r1], op.right, alpha=op.alpha)
        else:
            _dora(op, acc, first[r0:r1] if k else None, r0, r1, scratch)
    out[r0:r1].copy_(acc)


def _dora(
    op: _Op, acc: torch.Tensor, w0: torch.Tensor | None, r0: int, r1: int, scratch: _Scratch
) -> None:
    """``acc <- m / ||w0 + d|| * (acc + d)``; with ``w0`` None, ``acc`` is still ``w0``."""
    import torch

    if w0 is None:
        acc.addmm_(op.left[r0:r1], op.right, alpha=op.alpha)
        v = acc
    else:
        v = scratch.get(acc.numel(), acc.dtype, slot=1).view_as(acc)
        torch.mm(op.left[r0:r1], op.right, out=v)
        v.mul_(op.alpha)
        acc.add_(v)
        v.add_(w0)
    if op.columnwise:
        acc.mul_((op.magnitude / torch.linalg.vector_norm(v, dim=0)).view(1, -1))
    else:
        acc.mul_((op.magnitude[r0:r1] / torch.linalg.vector_norm(v, dim=1)).view(-1, 1))


def _stream(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: _Sources,
    dev: torch.device,
    reserve: Callable[[TensorPlan], memoryview],
) -> Iterator[_Copy | memoryview | None]:
    """For each planned tensor in order: a :class:`_Copy` (untouched), its merged bytes (a
    memoryview, valid until the next item is asked for), or None when the bytes were merged
    straight into ``reserve(tp)``, the place the consumer wants them.
    """
    ops = _prepare_ops(plan, adapters, dev)
    work = [tp for tp in plan.tensors if not tp.copied]
    if dev.type == "cuda":
        return _stream_cuda(plan, work, adapters, sources, ops, dev)
    return _stream_cpu(plan, adapters, sources, ops, reserve)


def _replacement(tp: TensorPlan, adapters: Sequence[LoraAdapter], dev: torch.device):
    if tp.replaced_by is None:
        return None
    i, key = tp.replaced_by
    return adapters[i].full[key].to(dev)


def _stream_cpu(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: _Sources,
    ops: Mapping[str, list[_Op]],
    reserve: Callable[[TensorPlan], memoryview],
) -> Iterator[_Copy | None]:
    """The CPU loop: worker threads take row blocks of each merged tensor in turn, reading the
    base through the page cache map and writing the result where the consumer wants it.

    torch's own intra-op threads are set to 1 meanwhile: with many short ops, a parallel
    region waits for its slowest thread, and on a busy machine that one is often descheduled.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    cpu = torch.device("cpu")
    local = threading.local()
    threads = torch.get_num_threads()

    def block(tp: TensorPlan, first, out, rows: tuple[int, int]) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = _Scratch(cpu)
        _merge_rows(tp, first, out, ops.get(tp.name, ()), rows, local.scratch)

    with ThreadPoolExecutor(threads, thread_name_prefix="lorahub-merge") as pool:
        for tp in plan.tensors:
            if tp.copied:
                yield sources.copy_of(tp)
                continue
            shape = _matrix(tp)
            src = sources.mapped(tp).view(_torch_dtype(tp.source.dtype)).view(shape)
            rep = _replacement(tp, adapters, cpu)
            first = src if rep is None else rep.reshape(shape)
            target = torch.frombuffer(reserve(tp), dtype=torch.uint8)
            out = target.view(_torch_dtype(tp.dtype)).view(shape)
            blocks = _blocks(tp, ops.get(tp.name, ()), CPU_CHUNK)
            # Only while this tensor's blocks run: the caller's setting (read afresh, it may
            # change between items) is back by the yield.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for f in [pool.submit(block, tp, first, out, rows) for rows in blocks]:
                    f.result()
            finally:
                torch.set_num_threads(threads)
            del src, first, target, out
            sources.unmap(tp.source.file, tp.source.offsets[0], tp.source_nbytes)
            yield None


def _stream_cuda(
    plan: MergePlan,
    work: Sequence[TensorPlan],
    adapters: Sequence[LoraAdapter],
    sources: _Sources,
    ops: Mapping[str, list[_Op]],
    dev: torch.device,
) -> Iterator[_Copy | memoryview]:
    """The CUDA pipeline: read ahead into pinned buffers on a thread, copy up on one stream,
    merge on the compute stream, copy down on another, and write the previous tensor's bytes
    meanwhile. Slot ``j % SLOTS`` holds tensor ``j``; events order the reuse of each slot.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if not work:
        yield from (sources.copy_of(tp) for tp in plan.tensors)
        return
    depth, slots = 2, 3
    max_in = max(tp.source_nbytes for tp in work)
    max_out = max(tp.nbytes for tp in work)
    with torch.cuda.device(dev):
        pin_in = [torch.empty(max_in, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        pin_out = [torch.empty(max_out, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        dev_in = [torch.empty(max_in, dtype=torch.uint8, device=dev) for _ in range(slots)]
        dev_out = [torch.empty(max_out, dtype=torch.uint8, device=dev) for _ in range(slots)]
        up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        compute = torch.cuda.current_stream(dev)
        uploaded = [torch.cuda.Event() for _ in range(slots)]
        merged = [torch.cuda.Event() for _ in range(slots)]
        downloaded = [torch.cuda.Event() for _ in range(slots)]
    scratch = _Scratch(dev)
    reads: dict[int, Any] = {}
    pool = ThreadPoolExecutor(1, thread_name_prefix="lorahub-read")

    def read(j: int) -> None:
        s, tp = j % slots, work[j]
        uploaded[s].synchronize()  # the previous tensor in this slot has left the pinned buffer
        view = memoryview(pin_in[s][: tp.source_nbytes].numpy())
        sources.read_tensor(tp, view)

    def launch(j: int) -> None:
        reads.pop(j).result()
        s, tp = j % slots, work[j]
        with torch.cuda.device(dev):
            with torch.cuda.stream(up):
                up.wait_event(merged[s])  # tensor j - SLOTS is done reading dev_in[s]
                dev_in[s][: tp.source_nbytes].copy_(
                    pin_in[s][: tp.source_nbytes], non_blocking=True
                )
                uploaded[s].record(up)
            # On the compute stream explicitly: an iter_merged consumer may call next() under
            # a stream of its own, and the events below must order this work, not that.
            with torch.cuda.stream(compute):
                compute.wait_event(uploaded[s])
                compute.wait_event(downloaded[s])  # dev_out[s] has been copied down
                shape = _matrix(tp)
                src = dev_in[s][: tp.source_nbytes].view(_torch_dtype(tp.source.dtype))
                out = dev_out[s][: tp.nbytes].view(_torch_dtype(tp.dtype)).view(shape)
                rep = _replacement(tp, adapters, dev)
                first = src.view(shape) if rep is None else rep.reshape(shape)
                _merge_rows(tp, first, out, ops.get(tp.name, ()), (0, shape[0]), scratch)
                merged[s].record(compute)
            with torch.cuda.stream(down):
                down.wait_event(merged[s])
                pin_out[s][: tp.nbytes].copy_(dev_out[s][: tp.nbytes], non_blocking=True)
                downloaded[s].record(down)
        if j + slots < len(work):
            reads[j + slots] = pool.submit(read, j + slots)

    try:
        for j in range(min(slots, len(work))):
            reads[j] = pool.submit(read, j)
        for j in range(min(depth, len(work))):
            launch(j)
        j = 0
        for tp in plan.tensors:
            if tp.copied:
                yield sources.copy_of(tp)
                continue
            if j + depth < len(work):
                launch(j + depth)
            s = j % slots
            downloaded[s].synchronize()
            yield memoryview(pin_out[s][: tp.nbytes].numpy())
            j += 1
    finally:
        for fut in reads.values():
            fut.cancel()
        pool.shutdown(wait=True)
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------
# Reading the base


class _Sources:
    """Open base shards, checked up front to hold every byte their headers promise.

    The CPU path and the copies read through a private memory map, unmapping each tensor
    when done so the RSS stays small; the CUDA path and :func:`iter_merged` read with
    ``pread``. A shard truncated *during* a merge (after the check) gives a MergeError on the
    second and a SIGBUS on the first; either way nothing appears at the output path.
    """

    def __init__(self, base: BaseModel, plan: MergePlan) -> None:
        self.base = base
        self.root = base.root
        self.plan = plan
        self.fds: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def __enter__(self) -> _Sources:
        base = self.base
        if base.root is None:
            raise MergeError(
                f"base {base.source!r} has no local files; download it first "
                f"(hf download {base.repo_id or base.source})"
            )
        need: dict[str, int] = {}
        for tp in self.plan.tensors:
            info = tp.source
            if info.file is None or info.offsets is None:
                raise MergeError(f"base tensor {info.name!r} has no local file; download the base")
            need[info.file] = max(need.get(info.file, 0), info.offsets[1])
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
            raise MergeError(f"cannot open base shard {path}: {e.strerror}") from e
        self.fds[name] = fd
        head = os.pread(fd, 8, 0)
        size = os.fstat(fd).st_size
        start = 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else size + 1
        if size < start + end:
            raise MergeError(
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

        info = tp.source
        offset = self.starts[info.file] + info.offsets[0]
        m = self._map(info.file)
        return torch.frombuffer(m, dtype=torch.uint8, count=tp.source_nbytes, offset=offset)

    def pieces(self, item: _Copy, size: int = 16 << 20) -> Iterator[memoryview]:
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

    def copy_of(self, tp: TensorPlan) -> _Copy:
        info = tp.source
        return _Copy(info.file, self.starts[info.file] + info.offsets[0], tp.source_nbytes)

    def read_tensor(self, tp: TensorPlan, view: memoryview) -> None:
        info = tp.source
        self.read_into(info.file, self.starts[info.file] + info.offsets[0], view)

    def read_into(self, file: str, pos: int, view: memoryview) -> None:
        """Fill ``view`` from ``file`` at byte ``pos``; a short file is a :class:`MergeError`."""
        fd, done = self.fds[file], 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise MergeError(f"base shard {self.root / file} ended early; download it again")
            done += n


# ---------------------------------------------------------------------------------------------
# Writing the output


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
    progress: Callable[[int, int], None] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    inputs: Iterable[Input] = (),
) -> MergeResult:
    """Merge adapters into the base and write a checkpoint directory transformers can load.

    The output holds safetensors shards (``model.safetensors``, or ``model-0000k-of-0000n``
    plus ``model.safetensors.index.json``), the base's config, generation config and
    tokenizer files, and ``lorahub.json`` describing the merge (``extra_metadata`` keys are
    added at its top level, e.g. ``base_content_hash`` and ``adapters`` digests). It is
    written to a temporary directory beside ``out``, synced, then renamed into place: an
    interrupted merge never leaves a directory at ``out``.

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
        MergeError: ``out`` exists (without ``force``), or is not lorahub's to replace (a
            link, the current directory, an input, a folder with other files), too little
            free disk space, a truncated or unreadable base shard.

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
        raise MergeError(
            f"not enough free space in {out.parent}: the merge needs about "
            f"{human_size(plan.output_bytes + SPACE_MARGIN)}, {human_size(free)} is free"
        )
    with _Sources(base, plan) as sources, _io_errors(out):
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            written = _write_checkpoint(tmp, base, plan, adapters, sources, dev, progress)
            doc = _metadata(base, plan, adapters, dev, extra_metadata)
            written += _write_file(tmp / METADATA_NAME, json.dumps(doc, indent=2).encode())
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
    becomes a MergeError saying so; the caller has already removed its partial output."""
    try:
        yield
    except LorahubError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergeError(
                f"the disk under {out.parent} filled up during the merge; nothing was left at {out}"
            ) from exc
        where = f" ({exc.filename})" if exc.filename else ""
        raise MergeError(f"cannot merge to {out}: {exc.strerror or exc}{where}") from exc


def _write_checkpoint(
    tmp: Path,
    base: BaseModel,
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: _Sources,
    dev: torch.device,
    progress: Callable[[int, int], None] | None,
) -> int:
    total, done = plan.data_bytes, 0
    capacity = max([STAGING] + [tp.nbytes + ALIGN for tp in plan.tensors if not tp.copied])
    current: list[_ShardFile] = []
    written = 0
    stream = _stream(plan, adapters, sources, dev, lambda tp: current[0].reserve(tp.nbytes))
    with contextlib.closing(stream) as items:
        for shard in plan.shards:
            with _ShardFile(tmp / shard.name, capacity) as f:
                current[:] = [f]
                f.write(struct.pack("<Q", len(shard.header)) + shard.header)
                for tp in plan.tensors[shard.first : shard.first + shard.count]:
                    item = next(items)
                    if isinstance(item, _Copy):
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
        written += _write_file(tmp / INDEX_NAME, json.dumps(index, indent=2).encode())
    for name in plan.aux_files:
        written += _copy_aux(base.root / name, tmp / name, plan.dtype)
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
            raise MergeError(f"wrote {size} bytes to {self.path.name}, expected {expected}")
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
    """Copy a config or tokenizer file; the config's dtype follows a changed output dtype."""
    data = src.read_bytes()
    if dtype and src.name == "config.json":
        with contextlib.suppress(ValueError, RecursionError):
            config = json.loads(data)
            if isinstance(config, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = _TORCH_DTYPES[dtype]
                data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return _write_file(dst, data)


def _metadata(
    base: BaseModel,
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    dev: torch.device,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    import lorahub

    doc: dict[str, Any] = {
        "lorahub_version": getattr(lorahub, "__version__", "0.1.0"),
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
    files = [s.name for s in plan.shards] + ([INDEX_NAME] if len(plan.shards) > 1 else [])
    doc[FILES_KEY] = sorted([*files, *plan.aux_files, METADATA_NAME])
    return doc


def _result_dtype(plan: MergePlan) -> str:
    """The requested dtype, else the float dtype holding most of the output's bytes."""
    if plan.dtype:
        return plan.dtype
    sizes: dict[str, int] = {}
    for tp in plan.tensors:
        sizes[tp.dtype] = sizes.get(tp.dtype, 0) + tp.nbytes
    floats = {k: v for k, v in sizes.items() if k in FLOAT_DTYPES} or sizes
    return max(floats, key=floats.get) if floats else "F32"


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    try:
        publish_dir(tmp, out, replace=replace)
    except FileExistsError as e:
        raise MergeError(
            f"cannot move the merged checkpoint to {out}: {e.strerror}; nothing was replaced"
        ) from e
    except OSError as e:
        raise MergeError(f"cannot move the merged checkpoint to {out}: {e.strerror}") from e


_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _remove_stale(out: Path) -> None:
    """Delete leftovers of merges to ``out`` whose process is gone (killed mid-merge)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            m = _STALE_RE.match(entry.name)
            if m and m.group("name") == out.name and not process_alive(int(m.group("pid"))):
                log.info("removing %s, left by an interrupted merge", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
