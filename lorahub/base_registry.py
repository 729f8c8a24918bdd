"""Base models a store records: their tensor tables and fingerprints, so adapters can be
checked against a base by name without reading its files again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .aliases import Progress, StrPath
from .errors import AmbiguousReference, BaseModelError
from .info import BaseInfo
from .lazy import lazy_module
from .refs import validate_name

if TYPE_CHECKING:
    from . import upkeep
    from .base import BaseModel
    from .catalog import bases as bases_q
    from .catalog import db
    from .store import Store
else:
    upkeep = lazy_module("lorahub.upkeep")
    bases_q = lazy_module("lorahub.catalog.bases")
    db = lazy_module("lorahub.catalog.db")


def add_base(
    store: Store,
    source: StrPath,
    *,
    revision: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> BaseInfo:
    """Open a base model (folder, file or Hub repo id) and record it; see ``Hub.add_base``."""
    from .base import open_base

    if name is not None:
        validate_name(name)  # the rules adapter names follow: it is typed in commands too
    return record_base(store, open_base(source, revision=revision), source, name, progress)


def record_base(
    store: Store,
    model: BaseModel,
    source: StrPath,
    name: str | None = None,
    progress: Progress | None = None,
) -> BaseInfo:
    """Record an opened base: its content hash (local files only, cached), then its row and
    the base record ``fsck`` rebuilds it from."""
    from .base import content_hash

    digest = None
    if model.root is not None:
        digest = str(content_hash(model, cache_dir=store.home / "cache", progress=progress))
    label = name or model.repo_id or Path(os.fspath(source)).expanduser().resolve().name
    with db.write_session(store.engine) as s:
        row = bases_q.upsert(s, model, label, digest, rename=name is not None)
        store.records.put_base(upkeep.base_record(row))  # for `fsck`, before the commit
        return bases_q.to_info(row)


def list_bases(store: Store) -> list[BaseInfo]:
    """Every base model recorded, newest first."""
    with db.read_session(store.engine) as s:
        return [bases_q.to_info(r) for r in bases_q.all_rows(s)]


def remove_base(store: Store, reference: str) -> BaseInfo:
    """Forget the one recorded base ``reference`` names; see ``Hub.remove_base``."""
    with db.write_session(store.engine) as s:
        rows = bases_q.find(s, reference)
        if not rows:
            raise BaseModelError(f"no recorded base matches {reference!r}; see `lorahub base ls`")
        if len(rows) > 1:
            raise AmbiguousReference(
                reference,
                [f"{r.name} {r.content_hash or r.signature}" for r in rows],
                hint="give its content hash",
            )
        info = bases_q.to_info(rows[0])
        record = upkeep.base_record(rows[0])
        bases_q.delete(s, rows[0])
    store.records.remove_base(record)
    return info
