"""Keeping a store sound: garbage collection, verification and ``fsck``.

Each works from two accounts of what the store holds, and acts only where they agree: the
catalog (an index) and the store's own files (:mod:`lorahub.records`: manifests, journal,
base records). ``gc`` deletes a blob only when neither the catalog (read twice, through its
index and by a table scan) nor any manifest on disk that was not removed needs it; it
commits its catalog change before it deletes a file, so an interrupted ``gc`` leaves at
most an unused file. ``fsck`` replays the records into a scratch catalog and adds to the
real one whatever it lost, never removing anything from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .blobs import BlobStore
from .catalog import db
from .catalog import health as health_q
from .catalog import queries as q
from .digest import Digest, hash_bytes
from .errors import LorahubError, StoreError
from .fsutil import process_alive
from .info import GcReport, VerifyProblem, VerifyReport
from .records import BACKFILLED, Records, base_key

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from .catalog.models import Adapter, BaseModelRow

log = logging.getLogger(__name__)

# gc deletes unaccounted blobs (no manifest ever named them, or none says they were
# removed) only while they are at most this share of the store's bytes, unless forced.
MAX_UNACCOUNTED_SHARE = 0.5
Progress = Callable[[int, int], None]
Refetch = Callable[[str, str, Mapping[str, Any]], bool]


# ------------------------------------------------------------------------- journal events


def add_event(row: Adapter) -> dict[str, Any]:
    return {
        "op": "add",
        "digest": row.digest,
        "origin_kind": row.origin_kind,
        "origin": json.loads(row.origin),
        "created_at": row.created_at.isoformat(),
    }


def ref_event(op: str, name: str, tag: str, digest: str) -> dict[str, Any]:
    return {"op": op, "name": name, "tag": tag, "digest": digest}


def base_record(row: BaseModelRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "path": row.path,
        "repo_id": row.repo_id,
        "revision": row.revision,
        "signature": row.signature,
        "content_hash": row.content_hash,
        "tensor_count": row.tensor_count,
        "total_bytes": row.total_bytes,
        "tensor_table": row.tensor_table,
        "created_at": row.created_at.isoformat(),
    }


def backfill_records(engine: Engine, records: Records, lock_path: Path) -> None:
    """Write the records of a store made before they existed (once): every manifest, an
    ``add`` and ``tag`` event per adapter and name, every base."""
    marker = records.manifests.root / BACKFILLED
    if marker.exists():
        return
    from filelock import FileLock
    from sqlalchemy import select

    from .catalog.models import Adapter, BaseModelRow, Ref

    with FileLock(str(lock_path)):
        if marker.exists():
            return
        events: list[dict[str, Any]] = []
        with db.read_session(engine) as s:
            for row in s.scalars(select(Adapter).order_by(Adapter.created_at, Adapter.id)):
                records.put_manifest(row.digest, row.manifest, sync=False)
                events.append(add_event(row))
            for ref in s.scalars(select(Ref).order_by(Ref.created_at, Ref.id)):
                events.append(ref_event("tag", ref.name, ref.tag, ref.adapter.digest))
            for base in s.scalars(select(BaseModelRow)):
                records.put_base(base_record(base))
        if events and not any(True for _ in records.events()):
            records.commit(records.append(events))
        os.sync()  # the manifests above, written without one fsync each
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


@dataclass(frozen=True)
class Recorded:
    """What the journal says of the adapters whose manifests the store holds."""

    live: frozenset[str]  # added (and not aborted), no confirmed removal since
    removed: frozenset[str]  # a confirmed removal last
    journal: bool  # there is a journal at all

    def status(self, digest: str) -> str:
        """``live``, ``removed``, or ``abandoned``: a manifest whose add never reached the
        journal (killed before its commit). Without a journal every manifest counts as
        live: nothing is dropped on a missing file's word."""
        if digest in self.live or not self.journal:
            return "live"
        return "removed" if digest in self.removed else "abandoned"


def recorded(records: Records) -> Recorded:
    """An add counts unless its transaction was aborted (its commit confirmation may be
    what a crash lost); a removal only once confirmed. Doubt keeps data."""
    last: dict[str, str] = {}
    for e in records.events():
        if e.op == "add" or (e.op == "rm" and e.committed):
            last[str(e.get("digest"))] = e.op
    return Recorded(
        frozenset(d for d, op in last.items() if op == "add"),
        frozenset(d for d, op in last.items() if op == "rm"),
        records.journal_path.exists(),
    )


def _weights_of(manifest_text: str) -> str | None:
    try:
        value = json.loads(manifest_text)["weights"]["digest"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------- gc


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
    ``grace`` seconds. See the module docstring for what "nothing needs" means.

    Raises:
        StoreError: the catalog is damaged or disagrees with itself or with the store's
            files in a way that could make a live blob look unused; nothing is deleted.
    """
    cutoff = time.time() - grace
    damage = health_q.integrity_problems(engine, quick=True)
    if damage:
        raise StoreError(
            f"the catalog is damaged ({damage[0]}); gc deletes nothing it cannot account "
            "for. Run `lorahub fsck` to repair the catalog, then gc again"
        )
    session = db.read_session if dry_run else db.write_session
    with session(engine) as s:
        needed, in_catalog = _needed_by_catalog(s)
        journal = recorded(records)  # read under the write lock: no commit is half done
        on_disk_only: list[str] = []
        gone_manifests: list[Path] = []
        explained: set[str] = set()  # adapters removed, or adds that never committed
        for digest, mtime in records.manifest_digests():
            if digest in in_catalog:
                continue
            if journal.status(digest) != "live":
                explained.add(digest)
                if mtime < cutoff:
                    gone_manifests.append(records.manifests.path(Digest.parse(digest)))
                continue
            # Recorded, not removed, not in the catalog: a commit the catalog lost. Its
            # blob stays until `fsck` restores it.
            text = records.manifest_text(digest)
            weights = _weights_of(text) if text else None
            if weights:
                needed.add(weights)
            if mtime < cutoff:
                on_disk_only.append(digest)
        removed_weights = _weights_named_by(records, explained)
        all_blobs = list(blobs)
        doomed = [b for b in all_blobs if str(b.digest) not in needed and b.mtime < cutoff]
        unaccounted = [b for b in doomed if str(b.digest) not in removed_weights]  # no record
        total = sum(b.size for b in all_blobs)
        lost_bytes = sum(b.size for b in unaccounted)
        if (
            unaccounted
            and not force
            and (not in_catalog or lost_bytes > MAX_UNACCOUNTED_SHARE * total)
        ):
            why = (
                "the catalog lists no adapters"
                if not in_catalog
                else f"they are {lost_bytes * 100 // max(total, 1)}% of the store's bytes"
            )
            raise StoreError(
                f"gc would delete {len(unaccounted)} blob(s) that no removal accounts for, and "
                f"{why}: a lost or damaged catalog looks like this. Run `lorahub fsck` first; "
                "if you know they are garbage, run `lorahub gc --force`. Nothing was deleted"
            )
        if not dry_run:
            rows = health_q.blob_rows(s)
            from .catalog.models import Blob

            for b in doomed:
                if str(b.digest) in rows:
                    s.delete(s.get(Blob, str(b.digest)))
            on_disk = {str(b.digest) for b in all_blobs}
            for key in rows:  # rows whose file is already gone and that nothing uses
                if key not in needed and key not in on_disk:
                    s.delete(s.get(Blob, key))
    # The rows are gone and committed; now the files, each checked again under the write
    # lock: an add that committed since uses the blob, or refreshed its mtime.
    freed: list[str] = []
    size = 0
    if dry_run:
        freed = [str(b.digest) for b in doomed]
        size = sum(b.size for b in doomed)
    else:
        with db.write_session(engine) as s:
            still = q.referenced_weights(s) | set(health_q.blob_rows(s))
            live = health_q.adapter_digests(s)
            for b in doomed:
                path = blobs.path(b.digest)
                with contextlib.suppress(FileNotFoundError):
                    if str(b.digest) in still or path.lstat().st_mtime >= cutoff:
                        continue
                    path.unlink()
                    freed.append(str(b.digest))
                    size += b.size
            for path in gone_manifests:
                if str(Digest(path.parent.name + path.name)) not in live:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
    temps = blobs.sweep_temp(grace, dry_run=dry_run)
    size += sum(n for _, n in temps)
    leftovers = sweep_merged(engine, merged_dir, grace, dry_run=dry_run)
    size += sum(n for _, n in leftovers)
    return GcReport(
        tuple(freed),
        tuple(str(p) for p, _ in temps) + tuple(str(p) for p, _ in leftovers),
        size,
        dry_run,
        unrecorded=tuple(on_disk_only),
    )


def _needed_by_catalog(s: Session) -> tuple[set[str], set[str]]:
    """Blobs the catalog's adapters use, read through the index and by a table scan of
    every manifest; they must agree, else the catalog cannot be trusted to say what is
    unused (one changed byte in an index is enough to hide a live blob)."""
    by_index = q.referenced_weights(s)
    by_scan: set[str] = set()
    digests: set[str] = set()
    bad: list[str] = []
    for digest, weights, manifest in health_q.adapter_rows(s):
        digests.add(digest)
        by_scan.add(weights)
        stated = _weights_of(manifest)
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
    return by_scan, digests


def _weights_named_by(records: Records, digests: Iterable[str]) -> set[str]:
    """The weights blobs the manifest files of these adapters name."""
    out = set()
    for digest in digests:
        text = records.manifest_text(digest)
        weights = _weights_of(text) if text else None
        if weights:
            out.add(weights)
    return out


_LEFTOVER_RE = re.compile(r"^\..+\.(?:partial|old|evicted)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def sweep_merged(
    engine: Engine, merged_dir: Path, grace: float, *, dry_run: bool = False
) -> list[tuple[Path, int]]:
    """Leftovers in ``merged/`` older than ``grace``: partial and replaced folders of
    merges whose process is gone, old per-key lock files, and merged folders the catalog
    does not list. Links are removed as links, never followed."""
    from .catalog import merged as merged_q

    if not merged_dir.is_dir() or merged_dir.is_symlink():
        return []
    cutoff = time.time() - grace
    with db.read_session(engine) as s:
        known = {Path(r.path).name for r in merged_q.all_rows(s)}
    out: list[tuple[Path, int]] = []
    for entry in os.scandir(merged_dir):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            continue
        name = entry.name
        m = _LEFTOVER_RE.match(name)
        if m:
            if ".partial-" in name and (
                process_alive(int(m.group("pid"))) or _merging(merged_dir, name)
            ):
                continue  # a merge in flight (here, or in another host's pid space)
        elif name.endswith(".lock") and _KEY_RE.match(name[:-5]):
            key = name[:-5]
            if key in known or os.path.lexists(entry.path[:-5]):
                continue
        elif not (_KEY_RE.match(name) and name not in known):
            continue
        size = _tree_size(Path(entry.path))
        if m or name.endswith(".lock"):
            doomed: Path | None = Path(entry.path)
        else:
            doomed = _claim_unlisted(engine, merged_dir, Path(entry.path), dry_run=dry_run)
            if doomed is None:
                continue
        if not dry_run:
            _remove(doomed)
        out.append((Path(entry.path), size))
    return out


def _claim_unlisted(engine: Engine, merged_dir: Path, path: Path, *, dry_run: bool) -> Path | None:
    """Take a merged folder the catalog does not list out of its key's name, under the
    lock ``merged get`` holds from its merge to its catalog row (``.locks/<2 hex>.lock``,
    tried without waiting): a ``merged get`` in flight that has published the folder and
    not yet recorded it keeps it, whatever the grace. Renamed before it is deleted, so a
    gc killed in the middle leaves a leftover the next gc collects, never a half-deleted
    folder under the key's name. Returns where it now is, or None to keep it."""
    from .catalog import merged as merged_q
    from .layout import merged_lock

    try:
        with merged_lock(merged_dir, path.name, wait=False) as held:
            if not held:
                return None  # a merge of this key space is at work
            with db.read_session(engine) as s:
                if any(Path(r.path).name == path.name for r in merged_q.all_rows(s)):
                    return None  # recorded since the scan
            if dry_run or path.is_symlink() or not path.is_dir():
                return path
            aside = path.with_name(f".{path.name}.evicted-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return None
            return aside
    except StoreError:  # a linked lock: leave the folder alone
        return None


def _merging(merged_dir: Path, leftover: str) -> bool:
    """Whether a ``merged get`` holds the lock of the key a ``.<key>.partial-*`` is for."""
    from .layout import merged_lock

    key = leftover[1:33]
    if not _KEY_RE.match(key):
        return False
    try:
        with merged_lock(merged_dir, key, wait=False) as held:
            return not held
    except StoreError:
        return True  # cannot tell: keep it


def _tree_size(path: Path) -> int:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not follow links by default
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside


# ------------------------------------------------------------------------- verify


def verify_store(
    engine: Engine,
    blobs: BlobStore,
    records: Records,
    *,
    quick: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the database's own integrity, every blob (re-hashed unless ``quick``), every
    adapter row against its blob, its manifest and the manifest file, and that every
    adapter the store's files hold is in the catalog."""
    problems: list[VerifyProblem] = []
    for line in health_q.integrity_problems(engine, quick=quick):
        problems.append(VerifyProblem("catalog", str(engine.url), line))
    with db.read_session(engine) as s:
        blob_rows = health_q.blob_rows(s)
        adapters = health_q.adapter_rows(s)
        by_index = q.referenced_weights(s)
    total = sum(blob_rows.values())
    done = 0
    for digest, size in sorted(blob_rows.items()):
        problem = blobs.verify(Digest.parse(digest), size, quick)
        if problem:
            problems.append(VerifyProblem("blob", digest, problem))
        done += size
        if progress:
            progress(done, total)
    in_catalog = set()
    for digest, weights, text in adapters:
        in_catalog.add(digest)
        if weights not in blob_rows:
            problems.append(VerifyProblem("adapter", digest, f"weights blob {weights} has no row"))
        if str(hash_bytes(text.encode())) != digest:
            problems.append(
                VerifyProblem("adapter", digest, "manifest does not hash to its digest")
            )
        stated = _weights_of(text)
        if stated is None:
            problems.append(VerifyProblem("adapter", digest, "manifest is not valid"))
        elif stated != weights:
            problems.append(VerifyProblem("adapter", digest, "manifest names another blob"))
        if records.manifest_text(digest) is None:
            problems.append(
                VerifyProblem(
                    "adapter", digest, "its manifest file is missing or damaged; run `lorahub fsck`"
                )
            )
    if by_index != {w for _, w, _ in adapters}:
        problems.append(
            VerifyProblem("catalog", str(engine.url), "the weights index disagrees with the rows")
        )
    journal = recorded(records)
    settled = time.time() - 60  # younger ones may be adds in flight
    for digest, mtime in records.manifest_digests():
        if digest not in in_catalog and journal.status(digest) == "live" and mtime < settled:
            problems.append(
                VerifyProblem(
                    "adapter",
                    digest,
                    "the store's files hold it but the catalog does not; run `lorahub fsck`",
                )
            )
    return VerifyReport(len(blob_rows), len(adapters), tuple(problems))


# ------------------------------------------------------------------------- fsck


@dataclass(frozen=True)
class FsckReport:
    """What ``fsck`` found and did (with ``dry_run``, would do)."""

    catalog_set_aside: str | None = None
    reindexed: bool = False
    adapters_restored: tuple[str, ...] = ()
    names_restored: tuple[str, ...] = ()
    bases_restored: tuple[str, ...] = ()
    manifests_rewritten: tuple[str, ...] = ()
    blobs_repaired: tuple[str, ...] = ()
    blobs_quarantined: tuple[str, ...] = ()
    unrecovered: tuple[str, ...] = ()  # one sentence each
    notes: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.unrecovered

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def set_aside_if_damaged(db_path: Path, *, dry_run: bool = False) -> tuple[str | None, bool]:
    """Check a SQLite catalog file. An index-only fault is rebuilt in place (``REINDEX``);
    a file SQLite cannot read is renamed aside (never deleted) with its WAL, so a fresh
    catalog can be rebuilt. Returns (where it was moved, whether it was reindexed)."""
    if not db_path.exists() or db_path.stat().st_size == 0:
        return None, False
    try:
        problems = _sqlite_check(db_path)
        if not problems:
            return None, False
        if all("index" in p for p in problems):
            if dry_run:
                return None, True
            con = sqlite3.connect(db_path)
            try:
                con.execute("REINDEX")
                con.commit()
            finally:
                con.close()
            if not _sqlite_check(db_path):
                return None, True
    except sqlite3.DatabaseError:
        pass
    if dry_run:
        return str(db_path), False
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(db_path) + suffix)
        if src.exists():
            os.rename(src, Path(str(aside) + suffix))
    return str(aside), False


def _sqlite_check(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        lines = [r[0] for r in con.execute("PRAGMA integrity_check")]
    finally:
        con.close()
    return [] if lines == ["ok"] else lines


def fsck(
    engine: Engine,
    blobs: BlobStore,
    records: Records,
    *,
    dry_run: bool = False,
    quick: bool = False,
    refetch: Refetch | None = None,
    quarantine: Path | None = None,
) -> FsckReport:
    """Bring the catalog back in line with the store's files: replay the records into a
    scratch catalog, then add to the real one every adapter, name and base it lacks;
    rewrite missing manifest files from the catalog; re-fetch damaged or missing blobs
    from where they came from (``refetch``), else move damaged ones to ``quarantine``.
    Nothing is removed from the catalog."""
    restored: list[str] = []
    names: list[str] = []
    bases: list[str] = []
    rewritten: list[str] = []
    write = db.read_session if dry_run else db.write_session
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from .catalog.models import Adapter, BaseModelRow, Ref

    with write(engine) as dst:
        # The first statement takes the write lock; the records are read after it, so no
        # commit lands between the two reads.
        live_bases = {base_key(base_record(b)): b for b in dst.scalars(select(BaseModelRow))}
        scratch, unrecovered, notes = _replay(records, blobs)
        src = Session(scratch)
        for rec in records.bases():
            if base_key(rec) not in live_bases:
                bases.append(str(rec.get("name")))
                if not dry_run:
                    live_bases[base_key(rec)] = _insert_base(dst, rec)
        live = {a.digest: a for a in dst.scalars(select(Adapter))}
        for row in src.scalars(select(Adapter).order_by(Adapter.created_at, Adapter.id)):
            if row.digest not in live:
                restored.append(row.digest)
                if not dry_run:
                    live[row.digest] = _copy_adapter(dst, row, live_bases.values())
        taken = {(r.name, r.tag, r.variant): r.adapter.digest for r in dst.scalars(select(Ref))}
        unconfirmed = _unconfirmed_moves(records)
        for ref in src.scalars(select(Ref).order_by(Ref.created_at, Ref.id)):
            key = (ref.name, ref.tag, ref.variant)
            target = live.get(ref.adapter.digest)
            if key in taken and taken[key] in unconfirmed.get((ref.name, ref.tag), ()):
                continue  # a later move committed; only its confirmation was lost
            if key in taken and taken[key] != ref.adapter.digest:
                # Either the catalog lost the commit that moved the name, or the journal lost
                # the confirmation of a later move back: a person decides.
                unrecovered.append(
                    f"name {ref.name}:{ref.tag} points at {taken[key]} in the catalog, but "
                    f"the journal last set it to {ref.adapter.digest}; if the journal is "
                    f"right: `lorahub tag @{ref.adapter.digest} {ref.name}:{ref.tag}`"
                )
                continue
            if key in taken or (target is None and not dry_run):
                continue
            names.append(f"{ref.name}:{ref.tag} -> {ref.adapter.digest}")
            taken[key] = ref.adapter.digest
            if not dry_run:
                dst.add(
                    Ref(
                        name=ref.name,
                        tag=ref.tag,
                        variant=ref.variant,
                        adapter_id=target.id,  # type: ignore[union-attr]
                        created_at=ref.created_at,
                    )
                )
        if not dry_run:
            dst.flush()
        catalog_rows = [(a.digest, a.manifest) for a in live.values() if a.digest not in restored]
        src.close()
    for digest, text in catalog_rows:
        if records.manifest_text(digest) is not None:
            continue
        if str(hash_bytes(text.encode())) != digest:
            unrecovered.append(
                f"adapter {digest}: its catalog manifest is damaged and no file holds it"
            )
            continue
        rewritten.append(digest)
        if not dry_run:
            records.put_manifest(digest, text)
    named = _weights_named_by(records, (d for d, _ in records.manifest_digests()))
    stray = [b for b in blobs if str(b.digest) not in named]
    if stray:
        notes.append(
            f"{len(stray)} blob(s) belong to no recorded adapter (stored before lorahub kept "
            "manifests, or by an add that never finished); they cannot be turned back into "
            "adapters. `lorahub gc --force` deletes them"
        )
    repaired, quarantined = _repair_blobs(
        engine,
        blobs,
        dry_run=dry_run,
        quick=quick,
        refetch=refetch,
        quarantine=quarantine,
        unrecovered=unrecovered,
    )
    return FsckReport(
        adapters_restored=tuple(restored),
        names_restored=tuple(names),
        bases_restored=tuple(bases),
        manifests_rewritten=tuple(rewritten),
        blobs_repaired=tuple(repaired),
        blobs_quarantined=tuple(quarantined),
        unrecovered=tuple(unrecovered),
        notes=tuple(notes),
        dry_run=dry_run,
    )


def _unconfirmed_moves(records: Records) -> dict[tuple[str, str], set[str]]:
    """For each name, the digests that moves after its last confirmed event set it to.
    A writer killed between its commit and the confirmation leaves such a move: the
    catalog pointing there is the catalog being right, not a conflict."""
    moves: dict[tuple[str, str], set[str]] = {}
    for e in records.events():
        if e.op not in ("tag", "untag"):
            continue
        key = (str(e.get("name")), str(e.get("tag")))
        if e.committed:
            moves.pop(key, None)
        elif e.op == "tag":
            moves.setdefault(key, set()).add(str(e.get("digest")))
    return moves


def _replay(records: Records, blobs: BlobStore) -> tuple[Engine, list[str], list[str]]:
    """The catalog the records describe, built in memory: the journal replayed in order,
    then every manifest file no event mentions, as a nameless adapter."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import Session

    from .catalog.models import Base

    engine = create_engine("sqlite://")
    # As in the real catalog: removing an adapter must take its names (ON DELETE CASCADE),
    # or they would dangle, and point at the next adapter that reuses its row id.
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    unrecovered: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    failed: set[str] = set()
    journal = recorded(records)
    gone = journal.removed  # removed for good: gc may have taken their files
    with Session(engine) as s:

        def ensure(
            digest: str, kind: str | None, origin: Any, created: str | None
        ) -> Adapter | None:
            row = q.adapter_by_digest(s, digest)
            if row is not None or digest in failed:
                return row
            try:
                return _insert_from_manifest(s, records, blobs, digest, kind, origin, created)
            except LorahubError as exc:
                failed.add(digest)
                if digest not in gone:
                    unrecovered.append(f"adapter {digest}: {exc}")
                return None

        for e in records.events():
            digest = str(e.get("digest"))
            seen.add(digest)
            if not e.committed and e.op != "add":
                continue  # maybe rolled back: a name is not moved, nothing removed, on doubt
            if e.op == "add":
                ensure(digest, e.get("origin_kind"), e.get("origin"), e.get("created_at"))
            elif e.op == "rm":
                row = q.adapter_by_digest(s, digest)
                if row is not None:
                    q.delete_adapter(s, row)
            elif e.op == "tag":
                row = ensure(digest, None, None, None)
                if (
                    row is not None
                    and isinstance(e.get("name"), str)
                    and isinstance(e.get("tag"), str)
                ):
                    q.set_ref(s, e.get("name"), e.get("tag"), row)
            elif e.op == "untag":
                row = q.adapter_by_digest(s, digest)
                if row is not None:
                    q.remove_ref(s, str(e.get("name")), str(e.get("tag")), row.id)
                    s.expire(row)
        orphans = abandoned = 0
        for digest, _ in records.manifest_digests():
            if journal.status(digest) == "abandoned" and q.adapter_by_digest(s, digest) is None:
                abandoned += 1
            elif digest not in seen:
                orphans += 1
                ensure(digest, None, None, None)
        if orphans:
            notes.append(f"{orphans} manifest file(s) had no journal entry; restored without names")
        if abandoned:
            notes.append(
                f"{abandoned} manifest file(s) were left by adds that never committed; "
                "not restored (gc removes them)"
            )
        s.commit()
    return engine, unrecovered, notes


def _insert_from_manifest(
    s: Session,
    records: Records,
    blobs: BlobStore,
    digest: str,
    origin_kind: str | None,
    origin: Any,
    created_at: str | None,
) -> Adapter:
    from .manifest import BaseRef, skeleton

    text = records.manifest_text(digest)
    if text is None:
        raise StoreError("its manifest file is missing or damaged")
    manifest = json.loads(text)
    weights = _weights_of(text)
    if weights is None:
        raise StoreError("its manifest names no weights blob")
    size = int(manifest["weights"]["size"])
    if blobs.size(Digest.parse(weights)) is None:
        raise StoreError(f"its weights blob {weights} is missing; add or pull it again")
    provenance = manifest.get("provenance") or {}
    q.ensure_blob(s, weights, size)
    row = q.insert_adapter(
        s,
        digest=digest,
        manifest_text=text,
        adapter=skeleton(manifest),
        weights_digest=weights,
        size=size,
        base=BaseRef.from_dict(manifest.get("base")),
        base_id=None,
        origin_kind=origin_kind or str(provenance.get("kind") or "import"),
        origin=origin if isinstance(origin, dict) else {"recovered": True},
    )
    if created_at:
        with contextlib.suppress(ValueError):
            row.created_at = datetime.fromisoformat(created_at)
    return row


def _copy_adapter(dst: Session, row: Adapter, bases: Iterable[BaseModelRow]) -> Adapter:
    """``row`` of the scratch catalog as a new row of ``dst``, linked to its recorded base."""
    from .catalog.models import Adapter as AdapterRow
    from .catalog.models import AdapterModule

    def columns(obj: Any, model: Any, skip: tuple[str, ...]) -> dict[str, Any]:
        return {c.key: getattr(obj, c.key) for c in model.__table__.columns if c.key not in skip}

    q.ensure_blob(dst, row.weights_digest, row.size)
    copy = AdapterRow(**columns(row, AdapterRow, ("id", "base_id")))
    copy.base_id = next(
        (b.id for b in bases if row.base_content_hash and b.content_hash == row.base_content_hash),
        None,
    )
    copy.modules = [
        AdapterModule(**columns(m, AdapterModule, ("id", "adapter_id"))) for m in row.modules
    ]
    dst.add(copy)
    dst.flush()
    return copy


def _insert_base(dst: Session, rec: Mapping[str, Any]) -> BaseModelRow:
    from .catalog.models import BaseModelRow

    created = q.utcnow()
    with contextlib.suppress(TypeError, ValueError):
        created = datetime.fromisoformat(str(rec.get("created_at")))
    row = BaseModelRow(
        name=str(rec.get("name") or rec["signature"]),
        path=rec.get("path"),
        repo_id=rec.get("repo_id"),
        revision=rec.get("revision"),
        signature=rec["signature"],
        content_hash=rec.get("content_hash"),
        tensor_count=int(rec.get("tensor_count") or 0),
        total_bytes=int(rec.get("total_bytes") or 0),
        tensor_table=str(rec.get("tensor_table") or "[]"),
        created_at=created,
    )
    dst.add(row)
    dst.flush()
    return row


def _repair_blobs(
    engine: Engine,
    blobs: BlobStore,
    *,
    dry_run: bool,
    quick: bool,
    refetch: Refetch | None,
    quarantine: Path | None,
    unrecovered: list[str],
) -> tuple[list[str], list[str]]:
    """Each blob an adapter uses, checked; a bad one re-fetched from its adapter's source,
    else (damaged) moved to ``quarantine`` so it is never read as good data."""
    from sqlalchemy import select

    from .catalog.models import Adapter

    with db.read_session(engine) as s:
        users: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
        for digest, weights, kind, origin in s.execute(
            select(Adapter.digest, Adapter.weights_digest, Adapter.origin_kind, Adapter.origin)
        ):
            users.setdefault(weights, []).append((digest, kind, json.loads(origin)))
    repaired: list[str] = []
    quarantined: list[str] = []
    for weights, using in sorted(users.items()):
        problem = blobs.verify(Digest.parse(weights), None, quick)
        if problem is None:
            continue
        if dry_run:
            repaired.append(weights)
            continue
        fixed = False
        if refetch is not None:
            for _digest, kind, origin in using:
                with contextlib.suppress(LorahubError, OSError):
                    if refetch(weights, kind, origin):
                        fixed = blobs.verify(Digest.parse(weights)) is None
                if fixed:
                    break
        if fixed:
            repaired.append(weights)
            continue
        path = blobs.path(Digest.parse(weights))
        if problem != "missing" and quarantine is not None:
            quarantine.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, quarantine / Digest.parse(weights).hex)
                quarantined.append(weights)
        names = ", ".join(d for d, _, _ in using)
        unrecovered.append(
            f"blob {weights} is {problem} and could not be fetched again from its source; "
            f"add the adapter ({names}) again from its files or pull it again"
        )
    return repaired, quarantined
