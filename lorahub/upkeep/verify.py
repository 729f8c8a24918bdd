"""``verify``: check the store without changing it. The catalog's own integrity, every
blob against its row, every adapter row against its blob, its manifest and the manifest
file, and that every adapter the store's files hold is in the catalog."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..aliases import Progress
from ..blobs import BlobStore
from ..catalog import db
from ..catalog import health as health_q
from ..catalog import queries as q
from ..digest import Digest, hash_bytes
from ..info import VerifyProblem, VerifyReport
from ..records import Records
from .journal import recorded, shared_with_other_homes, weights_of

if TYPE_CHECKING:
    from sqlalchemy import Engine


# A manifest file younger than this may be an add in flight, not yet in the catalog.
SETTLE_S = 60


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
    adapter the store's files hold is in the catalog.

    Args:
        quick: check each blob's existence and size only, without re-hashing.
        progress: called with (bytes checked, bytes in all) after each blob.

    In the team setup (:func:`.journal.shared_with_other_homes`) this home's records know
    only its own writes: a manifest file is expected only for an adapter added here, and an
    adapter they hold that the catalog lacks was removed through another home, not lost.

    Returns:
        A report listing each problem; ``.ok`` when there is none.
    """
    problems: list[VerifyProblem] = []
    for line in health_q.integrity_problems(engine, quick=quick):
        problems.append(VerifyProblem("catalog", str(engine.url), line))
    with db.read_session(engine) as s:
        blob_rows = q.blob_rows(s)
        adapters = q.adapter_rows(s)
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
    shared = shared_with_other_homes(engine, blobs, records)
    journal = recorded(records)
    in_catalog = set()
    for digest, weights, text in adapters:
        in_catalog.add(digest)
        own = not shared or digest in journal.live  # its manifest file is this home's to keep
        problems.extend(_adapter_problems(records, digest, weights, text, blob_rows, own))
    if by_index != {w for _, w, _ in adapters}:
        problems.append(
            VerifyProblem("catalog", str(engine.url), "the weights index disagrees with the rows")
        )
    settled = time.time() - SETTLE_S
    for digest, mtime in () if shared else records.manifest_digests():
        if digest not in in_catalog and journal.status(digest) == "live" and mtime < settled:
            problems.append(
                VerifyProblem(
                    "adapter",
                    digest,
                    "the store's files hold it but the catalog does not; run `lorahub fsck`",
                )
            )
    return VerifyReport(len(blob_rows), len(adapters), tuple(problems))


def _adapter_problems(
    records: Records,
    digest: str,
    weights: str,
    text: str,
    blob_rows: dict[str, int],
    own: bool = True,
) -> list[VerifyProblem]:
    """One adapter row against its blob row, its manifest and (``own``) the manifest file."""
    out: list[VerifyProblem] = []
    if weights not in blob_rows:
        out.append(VerifyProblem("adapter", digest, f"weights blob {weights} has no row"))
    if str(hash_bytes(text.encode())) != digest:
        out.append(VerifyProblem("adapter", digest, "manifest does not hash to its digest"))
    stated = weights_of(text)
    if stated is None:
        out.append(VerifyProblem("adapter", digest, "manifest is not valid"))
    elif stated != weights:
        out.append(VerifyProblem("adapter", digest, "manifest names another blob"))
    if own and records.manifest_text(digest) is None:
        out.append(
            VerifyProblem(
                "adapter", digest, "its manifest file is missing or damaged; run `lorahub fsck`"
            )
        )
    return out
