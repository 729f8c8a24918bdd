"""Streaming merge of one or more LoRA adapters into a base checkpoint.

A merged checkpoint is mostly the base's own bytes, so the merge is an I/O job. The base is
read through a memory map (no copy out of the page cache); tensors no adapter touches are
copied through as raw bytes, never decoded; the others are merged one at a time, in float32
on the chosen device, and cast once to the output dtype.

The parts, each with one reason to change:

- :mod:`.plan`: what the output holds (tensors, dtypes, shards), decided and checked first;
- :mod:`.kernels`: the arithmetic of LoRA, DoRA, bias and replacement updates;
- :mod:`.source`: reading the base shards;
- :mod:`.stream`: the CPU and CUDA pipelines, and :func:`iter_merged`;
- :mod:`.writer`: the checkpoint folder on disk, written atomically (:func:`merge_to_dir`).

Example::

    base = open_base("meta-llama/Llama-3.2-1B")
    result = merge_to_dir(base, [adapter], out=Path("merged"), dtype="bf16")
"""

from __future__ import annotations

from ..units import parse_size
from .plan import (
    DEFAULT_MAX_SHARD_SIZE,
    MergePlan,
    ShardPlan,
    TensorPlan,
    Touch,
    normalize_dtype,
    plan_merge,
    resolve_device,
)
from .stream import iter_merged
from .writer import MergeResult, merge_to_dir

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "MergePlan",
    "MergeResult",
    "ShardPlan",
    "TensorPlan",
    "Touch",
    "iter_merged",
    "merge_to_dir",
    "normalize_dtype",
    "parse_size",
    "plan_merge",
    "resolve_device",
]
