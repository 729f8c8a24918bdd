"""Every error lorahub raises on purpose is a ``LorahubError``.

Subclasses also inherit the natural builtin, so generic handlers (``except LookupError``)
keep working, and they carry structured attributes for programs that want more than text.
"""

from __future__ import annotations

from collections.abc import Sequence


class LorahubError(Exception):
    """Base class: a message for a person, saying what went wrong and what to do."""


class InvalidReference(LorahubError, ValueError):
    """A reference string (``name:tag``, ``@digest``, prefix) that cannot be parsed."""


class AdapterNotFound(LorahubError, LookupError):
    """A reference that points at nothing in the store."""

    def __init__(self, reference: str, message: str | None = None) -> None:
        self.reference = reference
        super().__init__(
            message or f"no adapter matches {reference!r}; see `lorahub ls` for what is stored"
        )


class AmbiguousReference(LorahubError, LookupError):
    """A digest prefix or multi-variant name that matches more than one adapter."""

    def __init__(self, reference: str, candidates: Sequence[str], hint: str = "") -> None:
        self.reference = reference
        self.candidates = tuple(candidates)
        lines = "\n".join(f"  {c}" for c in self.candidates)
        super().__init__(
            f"{reference!r} is ambiguous; it matches:\n{lines}\n"
            + (hint or "give more characters of the digest")
        )


class InvalidAdapter(LorahubError, ValueError):
    """Adapter files that are missing, corrupt, hostile or self-contradictory."""


class IntegrityError(LorahubError, OSError):
    """Stored or downloaded bytes that do not match their recorded digest or size."""


class BlobCollision(IntegrityError):
    """New bytes whose digest names a stored blob with other content (xxh3 is not
    cryptographic); ``digest`` is that name."""

    def __init__(self, message: str, digest: str) -> None:
        self.digest = digest
        super().__init__(message)


class StoreError(LorahubError, OSError):
    """The store itself cannot be used (permissions, full disk, broken database)."""


class BaseModelError(LorahubError, ValueError):
    """A base model that cannot be read or identified."""


class IncompatibleAdapter(LorahubError, ValueError):
    """An adapter that does not fit a base model; the report names every mismatch."""

    def __init__(self, message: str, report: object | None = None) -> None:
        self.report = report
        super().__init__(message)


class MergeError(LorahubError, RuntimeError):
    """A merge that cannot be carried out (output exists, no disk space, bad shard)."""


class ComposeError(LorahubError, ValueError):
    """A composition whose inputs cannot be combined."""


class RemoteError(LorahubError, OSError):
    """A Hub request that failed: missing repo, revision or file, auth, or a hostile answer."""
