"""``fsck``: bring the catalog back in line with the store's own files. The records are
replayed into a scratch catalog (:mod:`.replay`) and the real one gains whatever it lacks;
missing manifest files are rewritten and bad blobs fetched again or quarantined. Nothing is
removed from the catalog: what the two accounts disagree on is left to a person."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..blobs import BlobStore
from ..catalog import db
from ..catalog import queries as q
from ..digest import Digest, hash_bytes
from ..errors import LorahubError
from ..records import Records, base_key
from .journal import base_record, unconfirmed_moves, weights_named_by
from .replay import replay_records

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from ..catalog.models import Adapter, BaseModelRow

# Writes blob ``weights`` again from an adapter's source (origin kind, origin); True if it did.
Refetch = Callable[[str, str, Mapping[str, Any]], bool]


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
        """Plain data for JSON: each field (tuples as lists) and ``ok``."""
        d: dict[str, Any] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()
        }
        d["ok"] = self.ok
        return d


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
    Nothing is removed from the catalog. ``Hub.fsck`` first sets an unreadable SQLite
    catalog aside and rebuilds a damaged index."""
    restored: list[str] = []
    bases: list[str] = []
    write = db.read_session if dry_run else db.write_session
    from sqlalchemy.orm import Session

    with write(engine) as dst:
        # The first statement takes the write lock; the records are read after it, so no
        # commit lands between the two reads.
        live_bases = {base_key(base_record(b)): b for b in q.all_bases(dst)}
        scratch, unrecovered, notes = replay_records(records, blobs)
        src = Session(scratch)
        for rec in records.bases():
            if base_key(rec) not in live_bases:
                bases.append(str(rec.get("name")))
                if not dry_run:
                    live_bases[base_key(rec)] = _insert_base(dst, rec)
        live = {a.digest: a for a in q.all_adapters(dst)}
        for row in q.all_adapters(src, oldest_first=True):
            if row.digest not in live:
                restored.append(row.digest)
                if not dry_run:
                    live[row.digest] = _copy_adapter(dst, row, live_bases.values())
        names = _restore_names(dst, src, records, live, dry_run=dry_run, unrecovered=unrecovered)
        if not dry_run:
            dst.flush()
        catalog_rows = [(a.digest, a.manifest) for a in live.values() if a.digest not in restored]
        src.close()
    rewritten = _rewrite_manifests(records, catalog_rows, dry_run=dry_run, unrecovered=unrecovered)
    named = weights_named_by(records, (d for d, _ in records.manifest_digests()))
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


def _restore_names(
    dst: Session,
    src: Session,
    records: Records,
    live: Mapping[str, Adapter],
    *,
    dry_run: bool,
    unrecovered: list[str],
) -> list[str]:
    """Add to ``dst`` each name of the replayed catalog ``src`` it lacks. A name the two
    set differently is left as it is, and said in ``unrecovered`` when a person decides."""
    from ..catalog.models import Ref

    names: list[str] = []
    taken = {(r.name, r.tag, r.variant): r.adapter.digest for r in q.all_refs(dst)}
    unconfirmed = unconfirmed_moves(records)
    for ref in q.all_refs(src, oldest_first=True):
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
        if target is not None and not dry_run:
            dst.add(
                Ref(
                    name=ref.name,
                    tag=ref.tag,
                    variant=ref.variant,
                    adapter_id=target.id,
                    created_at=ref.created_at,
                )
            )
    return names


def _rewrite_manifests(
    records: Records,
    catalog_rows: Iterable[tuple[str, str]],
    *,
    dry_run: bool,
    unrecovered: list[str],
) -> list[str]:
    """Write the manifest file of each ``(digest, manifest)`` the store lacks, from the
    catalog's copy when it still hashes to its digest."""
    rewritten: list[str] = []
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
    return rewritten


def _copy_adapter(dst: Session, row: Adapter, bases: Iterable[BaseModelRow]) -> Adapter:
    """``row`` of the scratch catalog as a new row of ``dst``, linked to its recorded base."""
    from ..catalog.models import Adapter as AdapterRow
    from ..catalog.models import AdapterModule

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
    from ..catalog.models import BaseModelRow

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
    users: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    with db.read_session(engine) as s:
        for digest, weights, kind, origin_text in q.adapter_origins(s):
            users.setdefault(weights, []).append((digest, kind, json.loads(origin_text)))
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
        if (
            problem != "missing"
            and quarantine is not None
            and blobs.quarantine(Digest.parse(weights), quarantine)
        ):
            quarantined.append(weights)
        names = ", ".join(d for d, _, _ in using)
        unrecovered.append(
            f"blob {weights} is {problem} and could not be fetched again from its source; "
            f"add the adapter ({names}) again from its files or pull it again"
        )
    return repaired, quarantined
