"""Names (``name:tag``) on stored adapters: giving one, and taking one off.

An adapter left without names leaves the catalog with its last name; its blob stays until
``gc``, since other adapters may share it. Every change is journaled with its commit.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .aliases import StrPath
from .errors import AdapterNotFound, InvalidReference
from .info import AdapterInfo
from .lazy import lazy_module
from .refs import format_ref, parse

if TYPE_CHECKING:
    from . import upkeep
    from .catalog import queries as q
    from .store import Store
else:
    upkeep = lazy_module("lorahub.upkeep")
    q = lazy_module("lorahub.catalog.queries")


def tag(store: Store, reference: str, new: str) -> AdapterInfo:
    """Give the adapter ``reference`` names another name ``new`` (``name[:tag]``)."""
    target = parse(new)
    if target.name is None:
        raise InvalidReference(f"{new!r} is a digest; a tag must be a name like 'sql-expert:prod'")
    with store.writing() as (s, events):
        row = q.resolve_one(s, parse(reference))
        q.set_ref(s, target.name, target.tag, row)
        events.append(upkeep.ref_event("tag", target.name, target.tag, row.digest))
        s.refresh(row)
        return q.to_info(row)


def remove(
    store: Store,
    reference: str,
    variant: AdapterInfo | None = None,
    base: StrPath | None = None,
) -> list[str]:
    """Take ``reference``'s name off its adapter (the adapter goes with its last name), or for a
    digest the adapter and all its names. ``variant`` is the one it resolved to for
    ``base``: only a variant recorded for that base is removed. Returns the names removed,
    else the digest.

    Raises:
        AdapterNotFound: nothing matches, or ``variant`` was made for another base.
    """
    if variant is not None and variant.match != "exact":  # only the one made for this base
        raise AdapterNotFound(
            reference,
            f"{reference!r} has no variant recorded for {os.fspath(base or '')} (the one that "
            f"fits, {variant.short}, was made for another base); nothing was removed",
        )
    ref = parse(reference)
    removed: list[str] = []
    with store.writing() as (s, events):
        row = q.resolve_one(s, ref if variant is None else parse("@" + variant.digest))
        if ref.name is not None and any(r.name == ref.name and r.tag == ref.tag for r in row.refs):
            q.remove_ref(s, ref.name, ref.tag, row.id)
            removed.append(format_ref(ref.name, ref.tag))
            events.append(upkeep.ref_event("untag", ref.name, ref.tag, row.digest))
            s.expire(row)
            if q.ref_count(s, row.id) == 0:
                q.delete_adapter(s, row)
                events.append({"op": "rm", "digest": row.digest})
        else:
            removed.extend(format_ref(r.name, r.tag) for r in row.refs)
            # Each name in the journal: a replay then knows which names the adapter held,
            # even when the move that gave it one lost its confirmation.
            events.extend(upkeep.ref_event("untag", r.name, r.tag, row.digest) for r in row.refs)
            q.delete_adapter(s, row)
            events.append({"op": "rm", "digest": row.digest})
        return removed or [row.digest]
