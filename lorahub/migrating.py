"""``migrate-store``: copy a store's catalog rows and blobs to a team setup (a database URL
and, optionally, an ``s3://`` blob store), so its adapters, names and bases are there too.

Blobs go first, each verified: the source's bytes hash to their name before they are sent
(:meth:`BlobStore.checked_path`), and the target's ``put_file`` hashes them again. A blob
already at the target is re-hashed there (by size only with ``quick``) and sent again when
damaged. Then the catalog rows, in one write transaction on the target: every base, adapter
and name it lacks, matched by content (a base by signature and content hash, an adapter by
digest, a name by name, tag and variant), never by row id, so a target that already holds
another store's adapters keeps them. A name the target sets to another adapter is left as it
is and reported. Running it again copies nothing. The catalog's row for a blob is only made
once its bytes are at the target (the store's invariant: a row never points at a missing
blob): an adapter added to this store while the blobs were copying (its blob not in the list
read first) is left out of that catalog copy, its blob copied in another round, then its rows.
Merged-checkpoint entries (a cache of this host's files) and access tokens stay.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import db
from .catalog import queries as q
from .digest import Digest
from .errors import InvalidArgument
from .store import Store

#: Rounds of blobs then catalog rows, for adapters added to the source while copying.
ROUNDS = 3

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from .blobs import BlobStore
    from .catalog.models import Adapter, BaseModelRow
    from .settings import Settings


@dataclass
class MigrateReport:
    """What ``migrate-store`` copied, and what was already at the target."""

    target_database: str  # password masked
    target_blobs: str
    blobs_copied: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    blobs_present: int = 0
    adapters_copied: list[str] = field(default_factory=list)
    adapters_present: int = 0
    names_copied: list[str] = field(default_factory=list)
    bases_copied: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # one sentence each

    @property
    def copied(self) -> int:
        """Everything copied: blobs, adapters, names and bases (0 on a second run)."""
        return sum(
            map(
                len, (self.blobs_copied, self.adapters_copied, self.names_copied, self.bases_copied)
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "copied": self.copied}


def migrate_store(
    engine: Engine,
    blobs: BlobStore,
    target: Settings,
    *,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MigrateReport:
    """Copy the catalog at ``engine`` and the blobs in ``blobs`` to the store ``target``
    describes (its ``database_url`` and ``blobs_url``); see the module docstring.

    Raises:
        InvalidArgument: the target's catalog is the source's own.
        CorruptData: a source blob is missing or damaged; nothing of the catalog was copied.
        StoreError: the target cannot be reached or written.
    """
    if target.db_url == engine.url.render_as_string(hide_password=False):
        raise InvalidArgument(
            f"--to-database is the current catalog ({db.safe_url(target.db_url)}); "
            "name another database"
        )
    dest = Store(target)
    try:
        dest_engine = dest.reopen_unchecked()  # a new catalog over these files is expected
        report = MigrateReport(db.safe_url(target.db_url), _where(dest.blobs))
        at_target: set[str] = set()  # digests of the blobs copied or verified there
        present: set[str] = set()  # adapters the target held already
        late: list[str] = []
        for _ in range(ROUNDS):
            with db.read_session(engine) as s:
                sizes = {d: n for d, n in q.blob_rows(s).items() if d not in at_target}
            _copy_blobs(blobs, dest.blobs, sizes, report, quick=quick, progress=progress)
            at_target |= sizes.keys()
            with db.read_session(engine) as src, db.write_session(dest_engine) as dst:
                late = _copy_catalog(src, dst, report, at_target, present)
            if not late:
                break
        report.adapters_present = len(present)
        report.conflicts = list(dict.fromkeys(report.conflicts))  # once, whatever the rounds
        report.conflicts += [
            f"adapter {digest} was added to this store while migrating; run migrate-store "
            "again to copy it"
            for digest in late
        ]
        return report
    finally:
        dest.close()


def _where(blobs: BlobStore) -> str:
    location = getattr(blobs, "location", None)
    return str(location.url) if location is not None else str(blobs.root)


def _copy_blobs(
    src: BlobStore,
    dst: BlobStore,
    sizes: dict[str, int],
    report: MigrateReport,
    *,
    quick: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    total = sum(sizes.values())
    done = 0
    same = _where(src) == _where(dst)
    for digest, size in sorted(sizes.items()):
        d = Digest.parse(digest)
        if same:  # only the catalog moves: still, every digest is checked
            if not quick:
                src.checked_path(d)
            report.blobs_present += 1
        elif dst.verify(d, size, quick) is None:
            report.blobs_present += 1
        else:
            path = src.checked_path(d)

            def write(tmp: Path, path: Path = path) -> None:
                shutil.copyfile(path, tmp)

            dst.put_file(write, expect=d, source=f"blob {digest}")
            report.blobs_copied.append(digest)
            report.bytes_copied += size
        done += size
        if progress:
            progress(done, total)


def _columns(obj: Any, skip: tuple[str, ...]) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns if c.key not in skip}


def _copy_catalog(
    src: Session, dst: Session, report: MigrateReport, at_target: set[str], present: set[str]
) -> list[str]:
    """Copy the rows the target lacks (the adapters it held already go in ``present``), but
    those of an adapter whose blob is not in ``at_target`` (added since the blobs were
    listed), and its names: those are returned (their digests) for another round."""
    from .catalog.models import Adapter as AdapterRow
    from .catalog.models import AdapterModule, BaseModelRow, Ref

    bases: dict[tuple[str, str | None], BaseModelRow] = {
        (b.signature, b.content_hash): b for b in q.all_bases(dst)
    }
    base_of: dict[int, BaseModelRow] = {}
    for base in q.all_bases(src):
        key = (base.signature, base.content_hash)
        if key not in bases:
            bases[key] = BaseModelRow(**_columns(base, ("id",)))
            dst.add(bases[key])
            report.bases_copied.append(base.name)
        base_of[base.id] = bases[key]
    dst.flush()
    live: dict[str, Adapter] = {a.digest: a for a in q.all_adapters(dst)}
    late: list[str] = []
    copied = set(report.adapters_copied)  # by an earlier round
    for row in q.all_adapters(src, oldest_first=True):
        if row.digest in live:
            if row.digest not in copied:
                present.add(row.digest)
            continue
        if row.weights_digest not in at_target:  # its blob may not be at the target
            late.append(row.digest)
            continue
        q.ensure_blob(dst, row.weights_digest, row.size)
        copy = AdapterRow(**_columns(row, ("id", "base_id")))
        copy.base_id = base_of[row.base_id].id if row.base_id in base_of else None
        copy.modules = [AdapterModule(**_columns(m, ("id", "adapter_id"))) for m in row.modules]
        dst.add(copy)
        dst.flush()
        live[row.digest] = copy
        report.adapters_copied.append(row.digest)
    taken = {(r.name, r.tag, r.variant): r.adapter.digest for r in q.all_refs(dst)}
    for ref in q.all_refs(src, oldest_first=True):
        rkey = (ref.name, ref.tag, ref.variant)
        if ref.adapter.digest not in live:  # its adapter waits for another round
            continue
        if rkey in taken:
            if taken[rkey] != ref.adapter.digest:
                report.conflicts.append(
                    f"name {ref.name}:{ref.tag} points at {taken[rkey]} in the target, at "
                    f"{ref.adapter.digest} here; left as it is"
                )
            continue
        dst.add(Ref(**_columns(ref, ("id", "adapter_id")), adapter_id=live[ref.adapter.digest].id))
        taken[rkey] = ref.adapter.digest
        report.names_copied.append(f"{ref.name}:{ref.tag}")
    dst.flush()
    return late
