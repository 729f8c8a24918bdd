"""The store's own account of itself on disk, so a lost or damaged catalog can be rebuilt.

The catalog is an index; what it indexes is also kept as files in the store:

``manifests/xxh128/ab/<30 hex>``
    each adapter's manifest, write-once, named by the adapter digest (which is the xxh3 of
    the manifest's bytes), written before the catalog row commits;
``journal.log``
    an append-only log of what the catalog was told: adapters added (with their origin)
    and removed, names set and dropped, in commit order (appended under the catalog's
    write lock, just before the commit, then confirmed after it); a replay gives back
    every name, and drops nothing on an unconfirmed event's word;
``bases/<key>.json``
    each recorded base model with its tensor table.

Nothing here knows SQL: :mod:`lorahub.upkeep` replays these records into a catalog.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blobs import BlobStore
from .digest import Digest, canonical_json, hash_bytes
from .errors import StoreError
from .fsutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

JOURNAL = "journal.log"
BACKFILLED = ".complete"  # in manifests/: every older adapter's records are written
OPS = ("add", "tag", "untag", "rm", "abort", "commit")


@dataclass(frozen=True)
class Event:
    """One line of the journal."""

    op: str
    id: str
    data: Mapping[str, Any]
    committed: bool = True  # its transaction's commit was confirmed

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


class Records:
    """Manifests, journal and base records of the store at ``home``."""

    def __init__(self, home: Path, tmp: Path) -> None:
        self.home = home
        self.manifests = BlobStore(home / "manifests", tmp)
        self.journal_path = home / JOURNAL
        self.bases_dir = home / "bases"

    # -------------------------------------------------------------- manifests

    def put_manifest(self, digest: str, text: str, *, sync: bool = True) -> None:
        """Write an adapter's manifest (a no-op when it is there with these bytes)."""
        self.manifests.put_bytes(
            text.encode(), Digest.parse(digest), source="a manifest", sync=sync
        )

    def manifest_text(self, digest: str) -> str | None:
        """The manifest stored for ``digest``, or None when missing or damaged."""
        path = self.manifests.path(Digest.parse(digest))
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if str(hash_bytes(data)) != str(Digest.parse(digest)):
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None

    def manifest_digests(self) -> Iterator[tuple[str, float]]:
        """``(adapter digest, mtime)`` of every manifest file."""
        for info in self.manifests:
            yield str(info.digest), info.mtime

    def has_manifests(self) -> bool:
        return self.manifests.any()

    # -------------------------------------------------------------- journal

    def append(self, events: Sequence[Mapping[str, Any]], *, sync: bool = True) -> list[str]:
        """Append events (each a dict with ``op``), durably unless ``sync=False``; returns
        their ids."""
        if not events:
            return []
        ids, lines = [], []
        for e in events:
            assert e["op"] in OPS, e
            ident = uuid.uuid4().hex[:16]
            ids.append(ident)
            lines.append(json.dumps({**e, "id": ident}, sort_keys=True, ensure_ascii=True))
        data = ("\n".join(lines) + "\n").encode()
        try:
            new = not self.journal_path.exists()
            fd = os.open(
                self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644
            )
            try:
                if _ends_torn(fd):  # a line cut short by a crash: never glue ours onto it
                    data = b"\n" + data
                view = memoryview(data)
                while view:  # one write: lines of concurrent writers never interleave
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if new and sync:
                fsync_dir(self.home)
        except OSError as exc:
            raise StoreError(
                f"cannot write the store's journal {self.journal_path}: {exc}"
            ) from exc
        return ids

    def commit(self, ids: Sequence[str]) -> None:
        """Confirm events whose catalog transaction committed. Best effort and not synced:
        a lost confirmation only makes a later replay keep what an unconfirmed removal
        would have dropped, the safe way round."""
        if ids:
            with contextlib.suppress(StoreError):
                self.append([{"op": "commit", "ids": list(ids)}], sync=False)

    def abort(self, ids: Sequence[str]) -> None:
        """Mark events whose catalog transaction did not commit (best effort)."""
        if ids:
            with contextlib.suppress(StoreError):
                self.append([{"op": "abort", "ids": list(ids)}])

    def events(self) -> Iterator[Event]:
        """Events in order, each saying whether its commit was confirmed; aborted ones and
        torn or foreign lines are skipped."""
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return
        parsed: list[tuple[str, str, dict[str, Any]]] = []
        aborted: set[str] = set()
        committed: set[str] = set()
        for line in raw.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                log.warning("skipping an unreadable line in %s", self.journal_path)
                continue
            if not isinstance(doc, dict) or doc.get("op") not in OPS:
                continue
            if doc["op"] in ("abort", "commit"):
                marks = aborted if doc["op"] == "abort" else committed
                marks.update(x for x in doc.get("ids") or () if isinstance(x, str))
                continue
            parsed.append((doc["op"], str(doc.get("id", "")), doc))
        for op, ident, doc in parsed:
            if ident not in aborted:
                yield Event(op, ident, doc, ident in committed)

    # -------------------------------------------------------------- bases

    def put_base(self, record: Mapping[str, Any]) -> None:
        """Keep a base record (name, place, fingerprints, tensor table); replaced in one
        step when it changes."""
        path = self.bases_dir / f"{base_key(record)}.json"
        data = canonical_json(dict(record))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if path.read_bytes() == data:
                return
        try:
            self.bases_dir.mkdir(exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write the base record {path}: {exc}") from exc

    def remove_base(self, record: Mapping[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.bases_dir / f"{base_key(record)}.json").unlink()

    def bases(self) -> list[dict[str, Any]]:
        """Every readable base record."""
        if not self.bases_dir.is_dir():
            return []
        out = []
        for path in sorted(self.bases_dir.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
            except (OSError, ValueError):
                log.warning("skipping the unreadable base record %s", path)
                continue
            if isinstance(doc, dict) and isinstance(doc.get("signature"), str):
                out.append(doc)
        return out


def _ends_torn(fd: int) -> bool:
    """Whether the file ends in the middle of a line."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def base_key(record: Mapping[str, Any]) -> str:
    """What tells base records apart, as the catalog matches them: content, else place."""
    keys = (
        ("signature", "content_hash")
        if record.get("content_hash")
        else ("signature", "path", "repo_id")
    )
    ident = {k: record.get(k) for k in keys}
    return hash_bytes(canonical_json(ident)).hex


def backfilled(records: Records) -> bool:
    """Whether the records of a store made before they existed have been written
    (:func:`lorahub.upkeep.backfill_records`)."""
    return (records.manifests.root / BACKFILLED).exists()
