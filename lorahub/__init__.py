"""lorahub: a content-addressed store and hub for LoRA adapters.

    import lorahub
    hub = lorahub.open()              # or lorahub.Hub(home=...)
    hub.add("./my-adapter", name="sql-expert:v1")

Attributes are imported lazily so ``import lorahub`` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AdapterNotFound,
    AmbiguousReference,
    IncompatibleAdapter,
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    LorahubError,
)

if TYPE_CHECKING:
    from .hub import Hub, open

__all__ = [
    "AdapterNotFound",
    "AmbiguousReference",
    "Hub",
    "IncompatibleAdapter",
    "IntegrityError",
    "InvalidAdapter",
    "InvalidReference",
    "LorahubError",
    "__version__",
    "open",
]


def __getattr__(name: str) -> Any:
    if name in ("Hub", "open"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'lorahub' has no attribute {name!r}")
