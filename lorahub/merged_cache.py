"""Merged checkpoints made on demand and kept under ``<home>/merged/``.

An entry is keyed by the digest of what it was made from (the base's content hash, each
adapter's digest and weight, the dtype), so the same inputs are merged once. Past
``merged_max_bytes`` the least recently used entries go.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .aliases import Progress, StrPath
from .digest import PREFIX, canonical_json, hash_bytes
from .errors import AdapterNotFound, AmbiguousReference, InvalidReference
from .info import AdapterInfo, MergedInfo
from .lazy import lazy_module
from .manifest import BaseRef
from .merging import merge_inputs, merge_metadata

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .base import BaseModel
    from .catalog import db
    from .catalog import merged as merged_q
    from .catalog import queries as q
    from .catalog.models import MergedEntry
    from .merge import MergeResult
    from .resolution import Resolver
    from .store import Store
else:
    db = lazy_module("lorahub.catalog.db")
    merged_q = lazy_module("lorahub.catalog.merged")
    q = lazy_module("lorahub.catalog.queries")

MIN_KEY_HEX = 8  # a merged key given by prefix: the cache is small, 8 hex digits will do


class MergedCache:
    """The merged checkpoints of ``store``, made through ``resolver``'s variants."""

    def __init__(self, store: Store, resolver: Resolver) -> None:
        self.store = store
        self.resolver = resolver
        self.root = store.home / "merged"

    def get(
        self,
        base: StrPath,
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        device: str = "auto",
        dtype: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """The merged checkpoint for these inputs, made on the first call; see
        ``Hub.merged``."""
        from .merge import normalize_dtype

        model, infos, w, base_ref = merge_inputs(self.resolver, base, adapters, weights)
        dt = normalize_dtype(dtype) or "base"
        parts = [[i.digest, x] for i, x in zip(infos, w, strict=True)]
        key_doc = {"base": base_ref.content_hash, "adapters": parts, "dtype": dt}
        key = str(hash_bytes(canonical_json(key_doc)))
        with layout.merged_lock(self.root, key):
            with db.write_session(self.store.engine) as s:
                row = merged_q.get(s, key)
                if row is not None and Path(row.path).is_dir():
                    merged_q.touch(row)
                    return Path(row.path)
                if row is not None:
                    s.delete(row)
            result = self._make(model, infos, w, base_ref, key, device, dtype, progress)
            gone = self._record(result, key, base_ref, infos, w)
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        return result.path

    def _make(
        self,
        model: BaseModel,
        infos: list[AdapterInfo],
        w: list[float],
        base_ref: BaseRef,
        key: str,
        device: str,
        dtype: str | None,
        progress: Progress | None,
    ) -> MergeResult:
        from .merge import merge_to_dir

        return merge_to_dir(
            model,
            [self.store.load_adapter(i) for i in infos],
            w,
            out=self.root / key.removeprefix(PREFIX),  # the full hex
            device=device,
            dtype=dtype,
            force=True,
            progress=progress,
            extra_metadata=merge_metadata(base_ref, infos, w),
        )

    def _record(
        self,
        result: MergeResult,
        key: str,
        base_ref: BaseRef,
        infos: list[AdapterInfo],
        w: list[float],
    ) -> list[Path]:
        """Insert the new entry's row and evict past the cap; returns the evicted folders,
        renamed aside, for the caller to delete once the lock is released."""
        size = sum(f.stat().st_size for f in result.path.iterdir() if f.is_file())
        info = MergedInfo(
            key=key,
            path=str(result.path),
            size=size,
            base_name=base_ref.name or "",
            base_content_hash=base_ref.content_hash or base_ref.signature or "",
            adapters=tuple((i.digest, x) for i, x in zip(infos, w, strict=True)),
            dtype=result.dtype,
            created_at=q.utcnow(),
            last_used_at=q.utcnow(),
        )
        with db.write_session(self.store.engine) as s:
            merged_q.insert(s, info)
            victims = merged_q.over_cap(s, self.store.settings.merged_max_bytes, keep=key)
            gone = []
            for v in victims:
                # Renamed aside before the row goes, so a process that rebuilds this
                # key right after never has its fresh directory deleted under it.
                aside = Path(v.path).with_name(f".{Path(v.path).name}.evicted-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(v.path, aside)
                    gone.append(aside)
                s.delete(v)
        return gone

    def entries(self) -> list[MergedInfo]:
        """Merged checkpoints kept in the store, most recently used first."""
        with db.read_session(self.store.engine) as s:
            return [merged_q.to_info(r) for r in merged_q.all_rows(s)]

    def remove(self, keys: Sequence[str] = (), *, all: bool = False) -> list[str]:
        """Delete merged checkpoints by key (or a 8+ hex prefix), or every one with ``all``."""
        removed = []
        with db.write_session(self.store.engine) as s:
            rows = merged_q.all_rows(s) if all else _find_each(s, keys)
            for row in rows:
                removed.append((row.key, Path(row.path)))
                s.delete(row)
        for _, path in removed:
            shutil.rmtree(path, ignore_errors=True)  # its .lock stays: another process may hold it
        return [k for k, _ in removed]


def _find_each(s: Session, keys: Sequence[str]) -> list[MergedEntry]:
    """The one entry each key (or prefix) names; a key given twice is removed once."""
    rows: list[MergedEntry] = []
    for k in dict.fromkeys(keys):
        if len(k.removeprefix(PREFIX)) < MIN_KEY_HEX:
            raise InvalidReference(f"merged key {k!r} is too short: give {MIN_KEY_HEX}+ hex")
        found = merged_q.find(s, k.lower())
        if not found:
            raise AdapterNotFound(k, f"no merged checkpoint matches {k!r}")
        if len(found) > 1:
            raise AmbiguousReference(k, [r.key for r in found])
        rows.extend(r for r in found if r not in rows)
    return rows
