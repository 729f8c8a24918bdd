"""Which stored adapter a reference means for a base model.

A name may have one variant per base model; a base is known by name, path, repo id or
fingerprint. :class:`Resolver` picks the variant recorded for that base's content, else one
whose shapes fit, and reports why each other variant does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import base_registry
from . import manifest as mf
from .aliases import StrPath
from .catalog import reads
from .errors import AdapterNotFound, AmbiguousReference, IncompatibleAdapter
from .info import AdapterInfo, AddResult, BaseInfo
from .manifest import BaseRef
from .refs import local_path, parse

if TYPE_CHECKING:
    from .base import BaseModel, TensorInfo
    from .compat import CompatReport
    from .store import Store


class AddPath(Protocol):
    """Adds the adapter at a path to the store (``Hub.add``)."""

    def __call__(self, source: StrPath, *, base: StrPath | None = ...) -> AddResult: ...


@dataclass(frozen=True)
class BaseContext:
    """A base's tensor table and identity, and its catalog row id (None when unrecorded)."""

    tensors: Mapping[str, TensorInfo]
    ref: BaseRef
    id: int | None


class Resolver:
    """Resolves references and bases against ``store``; ``add`` stores an adapter given by
    path first, so merges and checks always name stored digests."""

    def __init__(self, store: Store, add: AddPath) -> None:
        self.store = store
        self.add = add

    def base_context(self, base: StrPath, model: BaseModel | None = None) -> BaseContext:
        """A base's tensor table and identity: from the catalog when it is recorded under
        that name (no file access), else read from disk or the Hub and recorded."""
        text = os.fspath(base)
        if not Path(text).expanduser().exists():
            with self.store.reading() as run:
                rows = reads.find_bases(run, text)
                if len({r.content_hash or r.signature for r in rows}) > 1:
                    raise AmbiguousReference(
                        text,
                        [f"{r.name} {r.content_hash or r.signature}" for r in rows],
                        hint="give the base's path or its content hash",
                    )
                if rows:
                    info = rows[-1]
                    return BaseContext(_tensors(run, info.id), _base_ref(info), info.id)
        if model is not None:
            info = base_registry.record_base(self.store, model, text)
        else:
            info = base_registry.add_base(self.store, text)
        with self.store.reading() as run:
            return BaseContext(_tensors(run, info.id), _base_ref(info), info.id)

    def base_tensors(self, base: StrPath) -> Mapping[str, TensorInfo]:
        return self.base_context(base).tensors

    def fitting(self, infos: list[AdapterInfo], base: StrPath) -> list[AdapterInfo]:
        """The adapters among ``infos`` whose shapes fit ``base``."""
        from . import compat

        ctx = self.base_context(base)
        keep = []
        for info in infos:
            report = compat.check(mf.skeleton(info.manifest), ctx.tensors)
            if report.ok:
                keep.append(info)
        return keep

    def stored_ref(self, reference: str, base: StrPath | None) -> str:
        """``reference`` itself, or for a path (``./my-adapter``) the ``@digest`` of that
        adapter once added to the store: merges and checks record digests, and adding is
        idempotent. Single files are read against ``base`` (kohya names need it)."""
        path = local_path(reference)
        if path is None:
            return reference
        if not path.exists():
            raise AdapterNotFound(
                reference, f"{reference} does not exist: no adapter file or folder there"
            )
        result = self.add(path, base=base if path.is_file() else None)
        assert result.adapter is not None
        return "@" + result.adapter.digest

    def resolve(
        self,
        reference: str,
        base: StrPath,
        *,
        strict: bool,
        ctx: BaseContext | None = None,
    ) -> tuple[AdapterInfo, CompatReport]:
        """The variant of ``reference`` for ``base`` and how it fits. ``strict`` raises
        ``IncompatibleAdapter`` when none fits; else a single misfit is returned."""
        ctx = ctx or self.base_context(base)
        ref = parse(self.stored_ref(reference, base))
        with self.store.reading() as run:
            infos, named = reads.candidate_infos(run, ref)
            if not infos:
                raise reads.not_found(run, ref)
        if not named and len(infos) > 1:  # a prefix of several digests, not base variants
            raise AmbiguousReference(ref.text, [i.digest for i in infos])
        return _pick(reference, base, ctx, infos, strict=strict)


def _pick(
    reference: str,
    base: StrPath,
    ctx: BaseContext,
    infos: list[AdapterInfo],
    *,
    strict: bool,
) -> tuple[AdapterInfo, CompatReport]:
    """The best fitting of a name's variants: exact before compatible, and among equals
    the one recorded for this very architecture."""
    from . import compat

    reports = []
    for info in infos:
        report = compat.check(
            mf.skeleton(info.manifest),
            ctx.tensors,
            content_hash=ctx.ref.content_hash,
            recorded_hash=info.base.content_hash,
        )
        reports.append((info, report))
    for wanted in (compat.EXACT, compat.COMPATIBLE):
        fits = [(i, r) for i, r in reports if r.status == wanted]
        fits.sort(key=lambda ir: ir[0].base.signature != ctx.ref.signature)
        if fits:
            info, report = fits[0]
            return replace(info, match=wanted), report
    if not strict and len(reports) == 1:
        return reports[0]
    lines = [
        f"variant {i.short} (base {i.base.name or i.base.variant or 'unknown'}): "
        + r.summary.replace("\n", "\n    ")
        for i, r in reports
    ]
    raise IncompatibleAdapter(
        f"no variant of {reference!r} fits {os.fspath(base)}:\n" + "\n".join(lines),
        reports[0][1],
    )


def _tensors(run: reads.Run, base_id: int) -> dict[str, TensorInfo]:
    from .base import TensorInfo

    return {n: TensorInfo(n, d, s) for n, d, s in reads.tensor_table(run, base_id)}


def _base_ref(info: BaseInfo) -> BaseRef:
    return BaseRef(info.repo_id or info.name, info.revision, info.signature, info.content_hash)
