"""What the store's own records say: journal events written for the catalog's changes,
the reading of the journal that gc, verify and fsck share, and the one-time backfill of
the records of a store made before they existed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..blobs import BlobStore
from ..catalog import db
from ..catalog import queries as q
from ..records import BACKFILLED, Records

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..catalog.models import Adapter, BaseModelRow


def add_event(row: Adapter) -> dict[str, Any]:
    """The journal event of an adapter added to the catalog."""
    return {
        "op": "add",
        "digest": row.digest,
        "origin_kind": row.origin_kind,
        "origin": json.loads(row.origin),
        "created_at": row.created_at.isoformat(),
    }


def ref_event(op: str, name: str, tag: str, digest: str) -> dict[str, Any]:
    """The journal event of a name set (``tag``) or dropped (``untag``)."""
    return {"op": op, "name": name, "tag": tag, "digest": digest}


def base_record(row: BaseModelRow) -> dict[str, Any]:
    """The ``bases/<key>.json`` record of a base row."""
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

    with FileLock(str(lock_path)):
        if marker.exists():
            return
        events: list[dict[str, Any]] = []
        with db.read_session(engine) as s:
            for row in q.all_adapters(s, oldest_first=True):
                records.put_manifest(row.digest, row.manifest, sync=False)
                events.append(add_event(row))
            for ref in q.all_refs(s, oldest_first=True):
                events.append(ref_event("tag", ref.name, ref.tag, ref.adapter.digest))
            for base in q.all_bases(s):
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

    def status(self, digest: str) -> Literal["live", "removed", "abandoned"]:
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


def unconfirmed_moves(records: Records) -> dict[tuple[str, str], set[str]]:
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


def shared_with_other_homes(engine: Engine, blobs: BlobStore, records: Records) -> bool:
    """Whether other homes write this store too (the team setup): its blobs are in an object
    store and its catalog is not this home's own SQLite file. The shared catalog then alone
    says what is live: this home's records know only the adds and removals made here, so an
    adapter they hold that the catalog lacks was removed through another home, and a blob
    row with no adapter is a removal the catalog recorded. gc and verify ask this."""
    from ..s3blobs import S3BlobStore

    if not isinstance(blobs, S3BlobStore):
        return False  # a catalog shared without the blobs could not read other homes' adds
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database:
        return True
    return Path(url.database).resolve() != (records.home / "lorahub.db").resolve()


def weights_of(manifest_text: str) -> str | None:
    """The weights blob a manifest names, or None when it is not a valid manifest."""
    try:
        value = json.loads(manifest_text)["weights"]["digest"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def weights_named_by(records: Records, digests: Iterable[str]) -> set[str]:
    """The weights blobs the manifest files of these adapters name."""
    out = set()
    for digest in digests:
        text = records.manifest_text(digest)
        weights = weights_of(text) if text else None
        if weights:
            out.add(weights)
    return out
