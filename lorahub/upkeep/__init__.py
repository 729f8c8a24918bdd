"""Keeping a store sound: garbage collection, verification and ``fsck``.

Each works from two accounts of what the store holds, and acts only where they agree: the
catalog (an index) and the store's own files (:mod:`lorahub.records`: manifests, journal,
base records). ``gc`` deletes a blob only when neither the catalog (read twice, through its
index and by a table scan) nor any manifest on disk that was not removed needs it; it plans
first, then commits its catalog change before it deletes a file, so an interrupted ``gc``
leaves at most an unused file. ``fsck`` replays the records into a scratch catalog and adds
to the real one whatever it lost, never removing anything from it.

One module per concern:

- :mod:`.journal`: the events written to the journal, what gc, verify and fsck read from
  it, and the one-time backfill of an older store's records;
- :mod:`.gc`: the plan (:class:`GcPlan`, a pure function of the store's state) and its
  execution;
- :mod:`.sweep`: leftovers of merges in ``merged/``;
- :mod:`.verify`: checking without changing;
- :mod:`.replay`: the catalog the records describe, rebuilt in a scratch database;
- :mod:`.repair`: ``fsck``, which brings the real catalog back in line with it.
"""

from __future__ import annotations

from ..catalog.health import set_aside_if_damaged
from .gc import (
    MAX_UNACCOUNTED_SHARE,
    CatalogUse,
    GcBlob,
    GcManifest,
    GcPlan,
    Leftover,
    StoreState,
    collect_garbage,
    execute,
    plan_gc,
    preview,
    read_catalog,
    read_store,
    with_leftovers,
)
from .journal import (
    Recorded,
    add_event,
    backfill_records,
    base_record,
    recorded,
    ref_event,
)
from .repair import FsckReport, Refetch, fsck
from .replay import replay_records
from .sweep import sweep_merged
from .verify import Progress, verify_store

__all__ = [
    "MAX_UNACCOUNTED_SHARE",
    "CatalogUse",
    "FsckReport",
    "GcBlob",
    "GcManifest",
    "GcPlan",
    "Leftover",
    "Progress",
    "Recorded",
    "Refetch",
    "StoreState",
    "add_event",
    "backfill_records",
    "base_record",
    "collect_garbage",
    "execute",
    "fsck",
    "plan_gc",
    "preview",
    "read_catalog",
    "read_store",
    "recorded",
    "ref_event",
    "replay_records",
    "set_aside_if_damaged",
    "sweep_merged",
    "verify_store",
    "with_leftovers",
]
