"""Every error lorahub raises on purpose is a ``LorahubError``, in a family that says what
went wrong rather than which module noticed.

Families (catch these):

=================  ===========================================  ==========================
family             what went wrong                              data
=================  ===========================================  ==========================
``NotFound``       a reference, base or repo that is not there  (leaf: ``.reference``)
``InvalidInput``   a value or file lorahub cannot accept        (``InvalidArgument``: an
                                                                argument of the call;
                                                                ``DeviceUnavailable``: a
                                                                device this machine lacks)
``Conflict``       the destination exists, the name is taken    ``.target``
``CorruptData``    bytes that do not match their digest/size    ``.expected``, ``.actual``,
                                                                ``.path``
``Incompatible``   an adapter that does not fit a base          ``.report``
``RemoteError``    a Hub request that failed                    ``.repo_id``, ``.revision``,
                                                                ``.status``,
                                                                ``.server_message``
``StoreError``     the store or the disk cannot be used         (none)
=================  ===========================================  ==========================

Each family also inherits the natural builtin (``NotFound`` is a ``LookupError``,
``CorruptData`` an ``OSError``...), so generic handlers keep working. The names that
predate the families (``AdapterNotFound``, ``MergeError``, ``IntegrityError``...) stay
importable and catch what they always caught: a leaf that belongs to a family and to one of
those older names inherits from both (``MergeOutputConflict(Conflict, MergeError)``).

Data attributes are keyword-only and optional, so ``raise CorruptData("message")`` is
always valid, and pickling (``multiprocessing``) keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .aliases import StrPath


class LorahubError(Exception):
    """Base class: a message for a person, saying what went wrong and what to do."""

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from the message and the attributes, not by calling __init__ again (whose
        # signature differs per class), so errors survive multiprocessing intact.
        return (_rebuild, (type(self), self.args), self.__dict__ or None)


def _rebuild(cls: type[LorahubError], args: tuple[object, ...]) -> LorahubError:
    error = cls.__new__(cls)
    error.args = args
    return error


# ---------------------------------------------------------------------------------- families


class NotFound(LorahubError, LookupError):
    """A lookup that did not come back with exactly one thing: nothing matches (an adapter,
    a recorded base, a repo), or too much does (an ambiguous prefix)."""


class InvalidInput(LorahubError, ValueError):
    """A value or a file lorahub cannot accept as given: a malformed reference, a corrupt or
    hostile adapter, an unreadable base model, a composition that cannot be made."""


class InvalidArgument(InvalidInput):
    """An argument or option of the call itself (``--weights``, a dtype, a device, a size)."""


class DeviceUnavailable(InvalidInput):
    """A well-formed device this machine does not have: CUDA asked for where torch sees no
    GPU, or a CUDA index past the last device. The machine, not the call, is at fault."""


class Conflict(LorahubError):
    """What is to be written is already there: the destination exists and lorahub will not
    replace it, or the name (a tag) is taken. ``target`` is that destination or name."""

    def __init__(self, message: str, *, target: StrPath | None = None) -> None:
        self.target = os.fspath(target) if target is not None else None
        super().__init__(message)


class CorruptData(LorahubError, OSError):
    """Stored, exported or downloaded bytes that do not match their recorded digest or
    size, or that are missing where a digest says they should be.

    ``expected`` and ``actual`` are the digests (or sizes) compared, ``actual`` None when
    the bytes are missing; ``path`` is the file, where there is one. Named apart from
    SQLAlchemy's ``IntegrityError``; that name stays as an alias.
    """

    def __init__(
        self,
        message: str,
        *,
        expected: str | int | None = None,
        actual: str | int | None = None,
        path: StrPath | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.path = os.fspath(path) if path is not None else None
        super().__init__(message)


class Incompatible(LorahubError, ValueError):
    """Inputs that are each fine but do not fit together (an adapter and a base, parents of
    a composition); ``report`` is the ``CompatReport`` naming every mismatch, when one was
    made."""

    def __init__(self, message: str, report: object | None = None) -> None:
        self.report = report
        super().__init__(message)


class RemoteError(LorahubError, OSError):
    """A Hub request that failed: missing repo, revision or file, auth, or a hostile answer.

    ``repo_id`` and ``revision`` say what was asked for; ``status`` is the HTTP status when
    the server answered; ``server_message`` is what the server said, if anything.
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.status = status
        self.server_message = server_message
        super().__init__(message)


class StoreError(LorahubError, OSError):
    """The store itself, or the disk under an output, cannot be used (permissions, full
    disk, a broken or inconsistent catalog)."""


class DiskFull(StoreError):
    """No space is left on the disk under the store: free some, then retry (a server
    answers 507, Insufficient Storage)."""


# ----------------------------------------------------------- today's names, in their families


class AdapterNotFound(NotFound):
    """A reference that points at nothing in the store."""

    def __init__(self, reference: str, message: str | None = None) -> None:
        self.reference = reference
        super().__init__(
            message or f"no adapter matches {reference!r}; see `lorahub ls` for what is stored"
        )


class AmbiguousReference(NotFound):
    """A digest prefix or multi-variant name that matches more than one adapter."""

    def __init__(self, reference: str, candidates: Sequence[str], hint: str = "") -> None:
        self.reference = reference
        self.candidates = tuple(candidates)
        lines = "\n".join(f"  {c}" for c in self.candidates)
        super().__init__(
            f"{reference!r} is ambiguous; it matches:\n{lines}\n"
            + (hint or "give more characters of the digest")
        )


class InvalidReference(InvalidInput):
    """A reference string (``name:tag``, ``@digest``, prefix) that cannot be parsed."""


class InvalidAdapter(InvalidInput):
    """Adapter files that are missing, corrupt, hostile or self-contradictory."""


class BaseModelError(InvalidInput):
    """A base model that cannot be read or identified."""


class IncompatibleAdapter(Incompatible):
    """An adapter that does not fit a base model; the report names every mismatch."""


class MergeError(LorahubError, RuntimeError):
    """A merge that cannot be carried out. Raised as one of its leaves where the kind is
    known (``InvalidMergeArgument``, ``MergeOutputConflict``, ``MergeIOError``)."""


class ComposeError(InvalidInput):
    """A composition whose inputs cannot be combined."""


IntegrityError = CorruptData
"""The family's former name (it clashed with SQLAlchemy's); ``except IntegrityError`` still
catches every ``CorruptData``."""


class BlobCollision(CorruptData):
    """New bytes whose digest names a stored blob with other content (xxh3 is not
    cryptographic); ``digest`` is that name."""

    def __init__(self, message: str, digest: str) -> None:
        self.digest = digest
        super().__init__(message, expected=digest)


# ------------------------------------------------ leaves in a family and under an older name


class BaseNotFound(NotFound, BaseModelError):
    """A base model that is not there: no such path, repo or revision, or no recorded base
    matching a reference."""


class InvalidMergeArgument(InvalidArgument, MergeError):
    """A merge (or size, or device) argument that cannot be used: weights, dtype, shard
    size, device. A ``MergeError`` too, as it always was."""


class MergeDeviceUnavailable(DeviceUnavailable, MergeError):
    """A merge asked to run on a device this machine does not have."""


class InvalidMergeInput(InvalidInput, MergeError):
    """A merge input lorahub cannot compute with: a base tensor of a dtype this torch lacks."""


class MergeBaseNotFound(NotFound, MergeError):
    """A merge whose base has no weights on this machine (a Hub base not downloaded, or a
    tensor table without files): download it first."""


class IncompatibleMerge(Incompatible, MergeError):
    """Merge inputs that are each fine but do not fit together: two adapters replacing one
    base tensor, an adapter on a base tensor that is not float."""


class MergeOutputConflict(Conflict, MergeError):
    """``merge -o`` names a destination lorahub will not replace."""


class MergeIOError(StoreError, MergeError):
    """A merge that failed on the disk: a base shard that cannot be read or is short, a full
    disk, an output that cannot be moved into place."""


class OutputConflict(Conflict, StoreError):
    """An export destination lorahub will not replace, or any output that overlaps the
    store."""


class InvalidComposeArgument(InvalidArgument, ComposeError):
    """A composition argument that cannot be used: method, weights, rank, density, majority
    sign, seed, device. A ``ComposeError`` too, as it always was."""


class ComposeDeviceUnavailable(DeviceUnavailable, ComposeError):
    """A composition asked to run on a device this machine does not have."""


class IncompatibleParents(Incompatible, ComposeError):
    """Adapters that cannot be composed because they were made for different bases."""


class RemoteNotFound(RemoteError, NotFound):
    """A repo, revision or file the Hub says is not there (or not visible to this token)."""


class RemoteConflict(Conflict, RemoteError):
    """A push that would overwrite something on the Hub: a tag at another commit, a public
    repo asked to be private."""

    def __init__(
        self,
        message: str,
        *,
        target: str | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(message, target=target)  # Conflict, then RemoteError's defaults
        self.repo_id = repo_id
        self.revision = revision
