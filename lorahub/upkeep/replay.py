"""The catalog the store's records describe, rebuilt in a scratch database for ``fsck``:
the journal replayed in order, then every manifest file no event mentions. Nothing is
dropped on an unconfirmed event's word."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..blobs import BlobStore
from ..catalog import queries as q
from ..digest import Digest
from ..errors import LorahubError, StoreError
from ..records import Records
from .journal import recorded, weights_of

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from ..catalog.models import Adapter


def replay_records(records: Records, blobs: BlobStore) -> tuple[Engine, list[str], list[str]]:
    """The catalog the records describe, built in memory: the journal replayed in order,
    then every manifest file no event mentions, as a nameless adapter."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import Session

    from ..catalog.models import Base

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
            if e.op == "untag":
                _untag(s, e.get("name"), e.get("tag"), digest, e.committed)
                continue
            if not e.committed and e.op != "add":
                continue  # maybe rolled back: a name is not moved, nothing removed, on doubt
            if e.op == "add":
                ensure(digest, e.get("origin_kind"), e.get("origin"), e.get("created_at"))
            elif e.op == "rm":
                row = q.adapter_by_digest(s, digest)
                if row is not None:
                    q.delete_adapter(s, row)
            elif e.op == "tag" and isinstance(e.get("name"), str) and isinstance(e.get("tag"), str):
                row = ensure(digest, None, None, None)
                if row is not None:
                    q.set_ref(s, e.get("name"), e.get("tag"), row)
                else:  # its record is gone (removed, then collected): the name moved all the same
                    q.remove_ref(s, e.get("name"), e.get("tag"))
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


def _untag(s: Session, name: object, tag: object, digest: str, committed: bool) -> None:
    """Replay the removal of ``name:tag`` from ``digest``. Its writer read the name pointing
    there in the catalog, under the write lock: so the move that set it had committed, even
    if that move lost its confirmation, and is replayed first (else the name's older target
    would stand and come back). The removal itself counts only once confirmed."""
    from sqlalchemy import select

    from ..catalog.models import Ref

    if not isinstance(name, str) or not isinstance(tag, str):
        return
    row = q.adapter_by_digest(s, digest)
    if row is None:  # its record is gone: whatever the replay still names here is older
        q.remove_ref(s, name, tag)
        return
    here = select(Ref.id).where(Ref.name == name, Ref.tag == tag, Ref.adapter_id == row.id)
    if s.scalar(here) is None:
        q.set_ref(s, name, tag, row)
    if committed:
        q.remove_ref(s, name, tag, row.id)
    s.expire(row)


def _insert_from_manifest(
    s: Session,
    records: Records,
    blobs: BlobStore,
    digest: str,
    origin_kind: str | None,
    origin: Any,
    created_at: str | None,
) -> Adapter:
    from ..manifest import BaseRef, skeleton

    text = records.manifest_text(digest)
    if text is None:
        raise StoreError("its manifest file is missing or damaged")
    manifest = json.loads(text)
    weights = weights_of(text)
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
