"""``gc``: delete what nothing needs, in two steps, a frozen plan and then its execution.

The plan (:func:`plan_gc`) is a pure function of the store's state: its blob files, the
manifest files of adapters the catalog does not list, the journal, and what the catalog's
adapters use. A blob goes only when neither the catalog (read twice, through its index and
by a table scan) nor any manifest on disk that was not removed needs it.

Executing it has two phases. The catalog forgets the plan's blobs (:func:`forget`) in the
very transaction, under the write lock, that the plan was read in, so no add commits in
between; only then do files go (:func:`execute`), each checked again under the write lock.
An interrupted gc leaves at most an unused file, which the next one collects.

In the team setup (blobs in an object store, one catalog for several homes:
:func:`.journal.shared_with_other_homes`) the shared catalog alone says what is live: a
blob it names is never deleted, whatever this home's records say; a blob it has a row for
but no adapter uses was removed (through any home), so it is garbage like one this home
removed; an adapter this home's records hold and the catalog lacks was removed through
another home. This home's records then guard only its own adds that never committed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .. import paths
from ..blobs import BlobInfo, BlobStore
from ..catalog import db
from ..catalog import health as health_q
from ..catalog import queries as q
from ..digest import Digest, hash_bytes
from ..errors import StoreError
from ..info import GcReport
from ..records import Records
from .journal import Recorded, recorded, shared_with_other_homes, weights_of
from .sweep import sweep_merged

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

# gc deletes unaccounted blobs (no manifest ever named them, or none says they were
# removed) only while they are at most this share of the store's bytes, unless forced.
MAX_UNACCOUNTED_SHARE = 0.5


# ------------------------------------------------------------------------- the state read


@dataclass(frozen=True)
class CatalogUse:
    """What the catalog says is in use. ``weights`` was read through the index and by a
    table scan of every manifest, and the two agreed."""

    weights: frozenset[str]  # weights blobs its adapters use
    adapters: frozenset[str]  # its adapters' digests
    blob_rows: frozenset[str]  # the blobs it has a row for
    # Other homes write it too (the team setup): what it lacks was removed, not lost.
    shared: bool = False


@dataclass(frozen=True)
class ManifestFile:
    """The manifest file of an adapter the catalog does not list."""

    digest: str
    path: Path
    mtime: float
    weights: str | None  # the blob it names; None when missing, damaged or not a manifest


@dataclass(frozen=True)
class StoreState:
    """The store's own files, as gc saw them."""

    blobs: tuple[BlobInfo, ...]  # every blob file, in digest order
    manifests: tuple[ManifestFile, ...]  # manifests of adapters the catalog lacks
    journal: Recorded


def read_catalog(session: Session) -> CatalogUse:
    """What the catalog's adapters use, read through the index and by a table scan of every
    manifest; they must agree, else the catalog cannot be trusted to say what is unused
    (one changed byte in an index is enough to hide a live blob).

    Raises:
        StoreError: an adapter row disagrees with its manifest, or the index with the rows.
    """
    by_index = q.referenced_weights(session)
    by_scan: set[str] = set()
    digests: set[str] = set()
    bad: list[str] = []
    for digest, weights, manifest in q.adapter_rows(session):
        digests.add(digest)
        by_scan.add(weights)
        stated = weights_of(manifest)
        if stated != weights or str(hash_bytes(manifest.encode())) != digest:
            bad.append(digest)
        if stated:
            by_scan.add(stated)
    if bad or by_index != by_scan:
        what = (
            f"adapter {bad[0]}'s row disagrees with its manifest"
            if bad
            else ("its weights index disagrees with its adapter rows")
        )
        raise StoreError(
            f"the catalog is inconsistent ({what}); gc deletes nothing it cannot account for. "
            "Run `lorahub fsck` to repair it"
        )
    return CatalogUse(frozenset(by_scan), frozenset(digests), frozenset(q.blob_rows(session)))


def read_store(records: Records, blobs: BlobStore, *, catalogued: Collection[str]) -> StoreState:
    """The journal, the manifest files of adapters not in ``catalogued`` (with the blob
    each names), and every blob file. Read under the catalog's write lock when gc is to
    act on it, so no commit is half done."""
    journal = recorded(records)
    manifests = []
    for digest, mtime in records.manifest_digests():
        if digest in catalogued:
            continue
        text = records.manifest_text(digest)
        path = records.manifests.path(Digest.parse(digest))
        manifests.append(ManifestFile(digest, path, mtime, weights_of(text) if text else None))
    return StoreState(tuple(blobs), tuple(manifests), journal)


# ------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class GcBlob:
    """A blob file the plan deletes."""

    digest: str
    size: int
    # "unused": no adapter uses it, and a removal (or an add that never committed) named it,
    # or, on a shared catalog, the catalog has its row (an adapter used it, then went);
    # "unaccounted": no record names it (stored before lorahub kept manifests, or the
    # records were lost): gc refuses these while they are most of the store, unless forced.
    why: Literal["unused", "unaccounted"]


@dataclass(frozen=True)
class GcManifest:
    """A manifest file the plan deletes: its adapter was removed, or its add never
    committed."""

    digest: str
    path: Path
    why: Literal["removed", "abandoned"]


@dataclass(frozen=True)
class Leftover:
    """A stale temp file (``tmp/``), merge leftover (``merged/``) or the path folder of a
    removed adapter (``paths/``, :mod:`lorahub.paths`), and the bytes it frees."""

    path: Path | str  # a str for an object store's temp key or multipart upload
    size: int
    kind: Literal["temp", "merged", "path"]


@dataclass(frozen=True)
class GcPlan:
    """What a gc deletes, and why. Made by :func:`plan_gc`, carried out by :func:`forget`
    and :func:`execute`; a dry run reports it as it is (:meth:`report`)."""

    grace: float  # seconds: nothing younger is deleted
    cutoff: float  # the time (epoch seconds) the grace was counted back from
    blobs: tuple[GcBlob, ...] = ()  # in digest order, the order they are deleted in
    rows: tuple[str, ...] = ()  # blob rows to drop: the blobs above, and rows without a file
    manifests: tuple[GcManifest, ...] = ()
    # What a sweep would take now, listed by :func:`with_leftovers` for a preview. A
    # leftover is judged again when :func:`execute` sweeps, under the lock its writer or
    # merge holds, since one in flight may finish or stall in between.
    leftovers: tuple[Leftover, ...] = ()
    # Adapters the store's files hold that the catalog lost: kept, `lorahub fsck` restores.
    unrecorded: tuple[str, ...] = ()
    # Blobs nothing needs that are younger than the grace period, kept for now.
    young: tuple[GcBlob, ...] = ()

    @property
    def kept_bytes(self) -> int:
        """The bytes of the unused blobs the grace period keeps."""
        return sum(b.size for b in self.young)

    @property
    def bytes_freed(self) -> int:
        """What the plan frees, in bytes (manifest files, a few KB each, not counted)."""
        return sum(b.size for b in self.blobs) + sum(f.size for f in self.leftovers)

    def report(self) -> GcReport:
        """The plan as a dry run's report: what gc would free."""
        return GcReport(
            tuple(b.digest for b in self.blobs),
            tuple(str(f.path) for f in self.leftovers),
            self.bytes_freed,
            True,
            unrecorded=self.unrecorded,
            kept_blobs=tuple(b.digest for b in self.young),
            kept_bytes=self.kept_bytes,
            grace=self.grace,
        )


def plan_gc(
    catalog: CatalogUse, store: StoreState, *, grace: float, cutoff: float, force: bool = False
) -> GcPlan:
    """Decide what gc deletes: blobs and manifest files older than ``cutoff`` that nothing
    needs. A pure function of what was read; it neither reads nor deletes anything.

    Raises:
        StoreError: it would delete blobs no record accounts for while the catalog lists no
            adapters or they are more than ``MAX_UNACCOUNTED_SHARE`` of the store's bytes
            (a lost or damaged catalog looks like this), unless ``force``.
    """
    needed = set(catalog.weights)
    accounted: set[str] = set()  # named by removed adapters, or by adds that never committed
    manifests: list[GcManifest] = []
    unrecorded: list[str] = []
    for m in store.manifests:
        status = store.journal.status(m.digest)
        if status == "live" and catalog.shared:
            status = "removed"  # through another home: the shared catalog is the authority
        if status == "live":
            # Recorded, not removed, not in the catalog: a commit the catalog lost. Its
            # blob stays until `fsck` restores it.
            if m.weights:
                needed.add(m.weights)
            if m.mtime < cutoff:
                unrecorded.append(m.digest)
            continue
        if m.weights:
            accounted.add(m.weights)
        if m.mtime < cutoff:
            manifests.append(GcManifest(m.digest, m.path, status))
    if catalog.shared:
        accounted |= catalog.blob_rows
    unused = [
        GcBlob(str(b.digest), b.size, "unused" if str(b.digest) in accounted else "unaccounted")
        for b in store.blobs
        if str(b.digest) not in needed
    ]
    old = {str(b.digest) for b in store.blobs if b.mtime < cutoff}
    blobs = tuple(b for b in unused if b.digest in old)
    young = tuple(b for b in unused if b.digest not in old)
    if not force:
        _refuse_unaccounted(blobs, sum(b.size for b in store.blobs), bool(catalog.adapters))
    on_disk = {str(b.digest) for b in store.blobs}
    rows = [b.digest for b in blobs if b.digest in catalog.blob_rows]
    rows += sorted(k for k in catalog.blob_rows if k not in needed and k not in on_disk)
    return GcPlan(
        grace,
        cutoff,
        blobs=blobs,
        rows=tuple(rows),
        manifests=tuple(manifests),
        unrecorded=tuple(unrecorded),
        young=young,
    )


def _refuse_unaccounted(blobs: tuple[GcBlob, ...], total: int, catalog_lists: bool) -> None:
    unaccounted = [b for b in blobs if b.why == "unaccounted"]
    lost_bytes = sum(b.size for b in unaccounted)
    if not unaccounted or (catalog_lists and lost_bytes <= MAX_UNACCOUNTED_SHARE * total):
        return
    why = (
        "the catalog lists no adapters"
        if not catalog_lists
        else f"they are {lost_bytes * 100 // max(total, 1)}% of the store's bytes"
    )
    raise StoreError(
        f"gc would delete {len(unaccounted)} blob(s) that no removal accounts for, and "
        f"{why}: a lost or damaged catalog looks like this. Run `lorahub fsck` first; "
        "if you know they are garbage, run `lorahub gc --force`. Nothing was deleted"
    )


def with_leftovers(plan: GcPlan, engine: Engine, blobs: BlobStore, merged_dir: Path) -> GcPlan:
    """``plan`` with the stale temp files and merge leftovers a sweep would take now.
    Each sweep takes its own locks (the blob writers', a merge's): never call this inside
    a catalog write transaction, which a writer holding one of them may be waiting for."""
    temps = blobs.sweep_temp(plan.grace, dry_run=True)
    merged = sweep_merged(engine, merged_dir, plan.grace, dry_run=True)
    with db.read_session(engine) as s:
        live = q.adapter_digests(s)
    linked = paths.sweep(_paths_dir(merged_dir), live, grace=plan.grace, dry_run=True)
    found = [Leftover(p, n, "temp") for p, n in temps]
    found += [Leftover(p, n, "merged") for p, n in merged]
    found += [Leftover(p, n, "path") for p, n in linked]
    return replace(plan, leftovers=tuple(found))


def _paths_dir(merged_dir: Path) -> Path:
    """``paths/``, ``merged/``'s sibling in the store's home (:mod:`lorahub.layout`)."""
    return merged_dir.parent / paths.FOLDER


# ------------------------------------------------------------------------- carrying it out


def forget(session: Session, plan: GcPlan) -> None:
    """Phase one: drop the plan's blob rows, in the write transaction the plan was read
    in; they are committed with it, before any file is deleted."""
    q.drop_blob_rows(session, plan.rows)


def execute(plan: GcPlan, engine: Engine, blobs: BlobStore, merged_dir: Path) -> GcReport:
    """Phase two, once :func:`forget` committed: delete the plan's blob and manifest files,
    each checked again under the write lock (an add that committed since uses the blob, or
    refreshed its mtime; a removed adapter may have been added again) and the ``paths/``
    folders of adapters the catalog no longer lists (:mod:`lorahub.paths`), then sweep temp
    files and merge leftovers, each judged again under its own lock as it goes.

    Returns:
        What was freed, which can be less than the plan (or, for leftovers that went
        stale in between, a little more).
    """
    freed: list[str] = []
    size = 0
    young = list(plan.young)
    with db.write_session(engine) as s:
        still = q.referenced_weights(s) | set(q.blob_rows(s))
        live = q.adapter_digests(s)
        for b in plan.blobs:
            if b.digest in still:
                continue
            deleted = blobs.delete_unless_young(Digest.parse(b.digest), plan.cutoff)
            if deleted is False:  # refreshed since: young again
                young.append(b)
            elif deleted:
                freed.append(b.digest)
                size += b.size
        for m in plan.manifests:
            if m.digest not in live:
                with contextlib.suppress(FileNotFoundError):
                    m.path.unlink()
        # Under the write lock, after the blobs: no add commits meanwhile, and a removed
        # adapter's weights link is the last name of its bytes by now.
        linked = paths.sweep(_paths_dir(merged_dir), live, grace=plan.grace)
    temps = blobs.sweep_temp(plan.grace)
    leftovers = sweep_merged(engine, merged_dir, plan.grace) + linked
    size += sum(n for _, n in temps) + sum(n for _, n in leftovers)
    return GcReport(
        tuple(freed),
        tuple(str(p) for p, _ in temps) + tuple(str(p) for p, _ in leftovers),
        size,
        False,
        unrecorded=plan.unrecorded,
        kept_blobs=tuple(b.digest for b in young),
        kept_bytes=sum(b.size for b in young),
        grace=plan.grace,
    )


def preview(
    engine: Engine,
    blobs: BlobStore,
    records: Records,
    merged_dir: Path,
    *,
    grace: float,
    force: bool = False,
) -> GcPlan:
    """The plan a gc would carry out now, leftovers included; nothing is deleted.

    Raises:
        StoreError: as :func:`collect_garbage`.
    """
    cutoff = time.time() - grace
    _refuse_a_damaged_catalog(engine)
    with db.read_session(engine) as s:
        plan = _plan_in(s, records, blobs, grace=grace, cutoff=cutoff, force=force)
    return with_leftovers(plan, engine, blobs, merged_dir)


def collect_garbage(
    engine: Engine,
    blobs: BlobStore,
    records: Records,
    merged_dir: Path,
    *,
    grace: float,
    dry_run: bool = False,
    force: bool = False,
) -> GcReport:
    """Delete blobs nothing needs, stale temp files and merge leftovers, older than
    ``grace`` seconds (with ``dry_run``, report what would go). See the module docstring
    for what "nothing needs" means: a blob stays while the catalog or any manifest file
    needs it. ``grace`` protects an ``add`` between its blob and its row. Unless ``force``,
    gc will not delete blobs no recorded removal accounts for while the catalog is empty or
    they are most of the store's bytes.

    Raises:
        StoreError: the catalog is damaged or disagrees with itself or with the store's
            files in a way that could make a live blob look unused; nothing is deleted.
    """
    if dry_run:
        return preview(engine, blobs, records, merged_dir, grace=grace, force=force).report()
    cutoff = time.time() - grace
    _refuse_a_damaged_catalog(engine)
    with db.write_session(engine) as s:
        plan = _plan_in(s, records, blobs, grace=grace, cutoff=cutoff, force=force)
        forget(s, plan)
    return execute(plan, engine, blobs, merged_dir)


def _plan_in(
    session: Session,
    records: Records,
    blobs: BlobStore,
    *,
    grace: float,
    cutoff: float,
    force: bool,
) -> GcPlan:
    """The plan, from the catalog as ``session`` sees it and the store's files read after."""
    catalog = read_catalog(session)
    if shared_with_other_homes(session.get_bind().engine, blobs, records):
        catalog = replace(catalog, shared=True)
    store = read_store(records, blobs, catalogued=catalog.adapters)
    return plan_gc(catalog, store, grace=grace, cutoff=cutoff, force=force)


def _refuse_a_damaged_catalog(engine: Engine) -> None:
    damage = health_q.integrity_problems(engine, quick=True)
    if damage:
        raise StoreError(
            f"the catalog is damaged ({damage[0]}); gc deletes nothing it cannot account "
            "for. Run `lorahub fsck` to repair the catalog, then gc again"
        )
