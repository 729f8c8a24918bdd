"""The merge plan: every output tensor's source, dtype, shard and byte range, decided before
anything is read or written, after every adapter is checked against the base."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compat import check, require
from ..device import resolve_device as choose_device
from ..dtypes import ALIASES, DTYPE_BITS, FLOAT_DTYPES
from ..errors import (
    DeviceUnavailable,
    IncompatibleMerge,
    InvalidArgument,
    InvalidMergeArgument,
    MergeDeviceUnavailable,
)
from ..outputs import merge_aux_files

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..base import BaseModel, TensorInfo
    from ..compat import CompatReport

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
# A checkpoint file's name: its stem, then a shard number.
_WEIGHTS_NAME = re.compile(r"^(?P<stem>[^/\\]+?)(?:-\d{5}-of-\d{5})?\.safetensors$")
# The weight file stems loaders look for (transformers, diffusers): an output keeps its base's
# stem only when it is one of these.
LOADER_STEMS = frozenset({"model", "diffusion_pytorch_model"})


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
    stem: str = "model"  # the base's weight file naming: model, diffusion_pytorch_model...

    @property
    def index_name(self) -> str:
        """The shard index's name (``model.safetensors.index.json``), written with shards."""
        return f"{self.stem}.safetensors.index.json"

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
        InvalidMergeArgument: no adapters, or bad weights, dtype or shard size.
        IncompatibleMerge: two adapters replacing one tensor, or a base tensor that is not
            float.
    """
    if not adapters:
        raise InvalidMergeArgument("nothing to merge: give at least one adapter")
    try:
        weights = tuple(
            float(w) for w in (weights if weights is not None else [1.0] * len(adapters))
        )
    except (TypeError, ValueError):
        raise InvalidMergeArgument(
            f"weights must be numbers, got {list(weights or [])!r}"
        ) from None
    if not all(math.isfinite(w) for w in weights):
        raise InvalidMergeArgument(f"weights must be finite numbers, got {list(weights)}")
    if len(weights) != len(adapters):
        raise InvalidMergeArgument(
            f"got {len(weights)} weights for {len(adapters)} adapters; give one each"
        )
    out_dtype = normalize_dtype(dtype)
    if max_shard_size <= 0:
        raise InvalidMergeArgument(f"max_shard_size must be positive, got {max_shard_size}")

    touches, replaced, reports = _collect(base, adapters, weights)
    stem = weights_stem(base.files)
    plans, shards = _layout(base, touches, replaced, out_dtype, max_shard_size, stem)
    aux: tuple[str, ...] = ()
    if base.root is not None:
        aux = merge_aux_files(base.root, whole_folder=not one_file(base))
    aux_bytes = sum((base.root / a).stat().st_size for a in aux) if base.root else 0
    return MergePlan(plans, shards, weights, reports, out_dtype, aux, aux_bytes, stem)


def one_file(base: BaseModel) -> bool:
    """Whether the base was given as one ``.safetensors`` file: its folder may hold anything,
    so a merge copies only known config and tokenizer files from it."""
    if base.root is None or len(base.files) != 1:
        return False
    return base.root / base.files[0] == Path(base.source).expanduser().absolute()


def weights_stem(files: Sequence[str]) -> str:
    """The base's weight file naming, which the output keeps so that the loader of its kind
    finds it: ``diffusion_pytorch_model`` for a diffusers folder, ``model`` otherwise: also
    when the base's files have no one stem or a name no loader looks for (a base given as
    ``my-finetune.safetensors`` gives ``model.safetensors``, which ``from_pretrained`` finds).
    """
    stems = {m.group("stem") for m in map(_WEIGHTS_NAME.match, files) if m is not None}
    stem = stems.pop() if len(stems) == 1 else "model"
    return stem if stem in LOADER_STEMS else "model"


def normalize_dtype(dtype: str | None) -> str | None:
    """The safetensors code (``"BF16"``) of a user's spelling (``bf16``, ``torch.float16``).

    Raises:
        InvalidMergeArgument: not a float dtype lorahub knows.
    """
    if dtype is None:
        return None
    text = str(dtype).strip().removeprefix("torch.")
    if text.upper() in FLOAT_DTYPES:
        return text.upper()
    code = ALIASES.get(text.lower())
    if code is None:
        raise InvalidMergeArgument(f"unknown output dtype {dtype!r}; use bf16, fp16, fp32 or fp64")
    return code


def _collect(
    base: BaseModel, adapters: Sequence[LoraAdapter], weights: Sequence[float]
) -> tuple[dict[str, list[Touch]], dict[str, tuple[int, str]], tuple[CompatReport, ...]]:
    """Which base tensors each adapter touches or replaces, after checking it fits."""
    touches: dict[str, list[Touch]] = {}
    replaced: dict[str, tuple[int, str]] = {}
    reports = []
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        what = f"adapter {i + 1} of {len(adapters)}"
        report = check(adapter, base.tensors)
        require(report, f"merge {what} into {base.source}")
        reports.append(report)
        for key, target in report.full_mapping.items():
            if target in replaced:
                raise IncompatibleMerge(
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
            raise IncompatibleMerge(
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
    stem: str = "model",
) -> tuple[tuple[TensorPlan, ...], tuple[ShardPlan, ...]]:
    """Output tensors in the order they lie in the base files, packed greedily into shards."""
    file_index: dict[str | None, int] = {name: k for k, name in enumerate(base.files)}
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
    names = _shard_names(len(bounds), stem)
    shards = tuple(
        ShardPlan(names[k], f, c, b, _header(plans[f : f + c]))
        for k, (f, c, b) in enumerate(bounds)
    )
    return tuple(plans), shards


def _shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


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


def resolve_device(device: str) -> torch.device:
    """The torch device to merge on, by :func:`lorahub.device.resolve_device`'s rule.

    Raises:
        InvalidMergeArgument: an unknown device (a ``MergeError``, as a merge's device
            errors always were).
        MergeDeviceUnavailable: CUDA asked for where torch has none, or past the last GPU.
    """
    try:
        return choose_device(device)
    except DeviceUnavailable as exc:
        raise MergeDeviceUnavailable(str(exc)) from None
    except InvalidArgument as exc:
        raise InvalidMergeArgument(str(exc)) from None
