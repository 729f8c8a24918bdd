"""lorahub: a content-addressed store and hub for LoRA adapters.

    import lorahub
    hub = lorahub.open()              # or lorahub.Hub(home=...)
    hub.add("./my-adapter", name="sql-expert:v1")

Everything a caller handles is importable from here: ``Hub`` and ``open``; the result types
the ``Hub`` methods return (``AdapterInfo``, ``AddResult``, ``MergeResult``, ``CompatReport``,
``PushResult``, ``VerifyReport``, ``GcReport``, ``FsckReport``...), each with a ``to_dict()``
giving JSON-ready data; and every error, by family (``NotFound``, ``InvalidInput``,
``Conflict``, ``CorruptData``, ``Incompatible``, ``RemoteError``, ``StoreError``, all
``LorahubError``) and by leaf (:mod:`lorahub.errors` documents them).

Names whose modules import torch, SQLAlchemy or huggingface_hub are imported on first use,
so ``import lorahub`` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AdapterNotFound,
    AmbiguousReference,
    BaseModelError,
    BaseNotFound,
    BlobCollision,
    ComposeDeviceUnavailable,
    ComposeError,
    Conflict,
    CorruptData,
    DeviceUnavailable,
    DiskFull,
    Incompatible,
    IncompatibleAdapter,
    IncompatibleMerge,
    IncompatibleParents,
    IntegrityError,
    InvalidAdapter,
    InvalidArgument,
    InvalidComposeArgument,
    InvalidInput,
    InvalidMergeArgument,
    InvalidMergeInput,
    InvalidReference,
    LorahubError,
    MergeBaseNotFound,
    MergeDeviceUnavailable,
    MergeError,
    MergeIOError,
    MergeOutputConflict,
    NotFound,
    OutputConflict,
    RemoteConflict,
    RemoteError,
    RemoteNotFound,
    StoreError,
)
from .info import (
    AdapterInfo,
    AddResult,
    BaseInfo,
    ComposeResult,
    ExportResult,
    GcReport,
    MergedInfo,
    VerifyProblem,
    VerifyReport,
)

if TYPE_CHECKING:
    from .compat import CompatReport, Problem
    from .compose import ComposeReport
    from .hub import Hub, open
    from .merge.writer import MergeResult
    from .remote.push import PushResult
    from .upkeep.repair import FsckReport

# name -> the module that defines it, imported when the name is first asked for.
_LAZY = {
    "Hub": "lorahub.hub",
    "open": "lorahub.hub",
    "CompatReport": "lorahub.compat",
    "Problem": "lorahub.compat",
    "ComposeReport": "lorahub.compose",
    "MergeResult": "lorahub.merge.writer",
    "PushResult": "lorahub.remote.push",
    "FsckReport": "lorahub.upkeep.repair",
}

__all__ = [
    "AdapterInfo",
    "AdapterNotFound",
    "AddResult",
    "AmbiguousReference",
    "BaseInfo",
    "BaseModelError",
    "BaseNotFound",
    "BlobCollision",
    "CompatReport",
    "ComposeDeviceUnavailable",
    "ComposeError",
    "ComposeReport",
    "ComposeResult",
    "Conflict",
    "CorruptData",
    "DeviceUnavailable",
    "DiskFull",
    "ExportResult",
    "FsckReport",
    "GcReport",
    "Hub",
    "Incompatible",
    "IncompatibleAdapter",
    "IncompatibleMerge",
    "IncompatibleParents",
    "IntegrityError",
    "InvalidAdapter",
    "InvalidArgument",
    "InvalidComposeArgument",
    "InvalidInput",
    "InvalidMergeArgument",
    "InvalidMergeInput",
    "InvalidReference",
    "LorahubError",
    "MergeBaseNotFound",
    "MergeDeviceUnavailable",
    "MergeError",
    "MergeIOError",
    "MergeOutputConflict",
    "MergeResult",
    "MergedInfo",
    "NotFound",
    "OutputConflict",
    "Problem",
    "PushResult",
    "RemoteConflict",
    "RemoteError",
    "RemoteNotFound",
    "StoreError",
    "VerifyProblem",
    "VerifyReport",
    "__version__",
    "open",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorahub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
