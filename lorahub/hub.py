"""``Hub``: the public Python API, tying the blob store, the catalog and the formats together.

>>> import lorahub
>>> hub = lorahub.open(home="/tmp/lorahub-demo")
>>> info = hub.add("./my-peft-adapter", name="sql-expert:v1").adapter
>>> hub.export("sql-expert:v1", "./out")
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layout
from . import manifest as mf
from .adapter import LoraAdapter
from .blobs import BlobStore
from .catalog import lite, reads
from .digest import Digest, canonical_json, hash_bytes
from .errors import (
    AdapterNotFound,
    AmbiguousReference,
    BaseModelError,
    ComposeError,
    IncompatibleAdapter,
    InvalidAdapter,
    InvalidReference,
    LorahubError,
    MergeError,
    StoreError,
)
from .formats import peft
from .fsutil import current_umask, publish_dir
from .info import (
    AdapterInfo,
    AddResult,
    BaseInfo,
    ComposeResult,
    GcReport,
    MergedInfo,
    VerifyReport,
)
from .lazy import lazy_module
from .manifest import BaseRef
from .records import Records, backfilled
from .refs import Reference, format_ref, local_path, parse, validate_name
from .settings import Settings, load

if TYPE_CHECKING:
    import torch
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from . import upkeep
    from .base import BaseModel, TensorInfo
    from .catalog import bases as bases_q
    from .catalog import db
    from .catalog import health as health_q
    from .catalog import merged as merged_q
    from .catalog import queries as q
    from .compat import CompatReport
    from .merge import MergeResult
    from .remote import PushResult
else:  # SQLAlchemy, behind these, takes longer to import than `show` may take in all
    upkeep = lazy_module("lorahub.upkeep")
    bases_q = lazy_module("lorahub.catalog.bases")
    db = lazy_module("lorahub.catalog.db")
    health_q = lazy_module("lorahub.catalog.health")
    merged_q = lazy_module("lorahub.catalog.merged")
    q = lazy_module("lorahub.catalog.queries")

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0
Progress = Callable[[int, int], None]


class Hub:
    """A lorahub store: blobs on disk, a catalog in SQL.

    Args:
        home: the store directory; default ``LORAHUB_HOME`` or the user data directory.
        settings: overrides everything else (tests, embedding).
    """

    def __init__(
        self, home: str | os.PathLike[str] | None = None, *, settings: Settings | None = None
    ):
        self.settings = settings or load(home)
        self.home = self.settings.home
        layout.prepare(self.home, allow_symlinks=self.settings.allow_symlinks)
        self.blobs = BlobStore(self.home / "blobs", self.home / "tmp")
        self.records = Records(self.home, self.home / "tmp")
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        return f"Hub(home={str(self.home)!r})"

    @property
    def engine(self) -> Engine:
        """The catalog engine, migrated on first use."""
        if self._engine is None:
            self._engine = self._open_catalog(check=True)
        return self._engine

    @contextlib.contextmanager
    def _reading(self) -> Iterator[reads.Run]:
        """Plain-SQL reads (:mod:`lorahub.catalog.reads`): through the standard library's
        sqlite3 when the embedded catalog is there and current, so a command that only
        reads never imports SQLAlchemy; else through the engine."""
        if (
            self._engine is None
            and self.settings.database_url is None
            and backfilled(self.records)  # else the engine's open writes the records first
        ):
            path = self.home / "lorahub.db"
            conn = lite.open_current(path)
            if conn is not None:
                try:
                    yield lite.runner(conn, path)
                    return
                finally:
                    conn.close()
        with db.read_session(self.engine) as s:
            yield q.runner(s)

    def _open_catalog(self, *, check: bool) -> Engine:
        """Open and migrate the catalog. With ``check``, a new, empty catalog over a store
        that holds adapters is refused: it would look empty, and ``gc`` would then delete
        every blob. ``fsck`` opens it without the check, to rebuild it."""
        # Files first, then the schema: a concurrent first open migrates before it writes.
        holds = self.records.has_manifests() or self.blobs.any()
        engine = db.make_engine(self.settings.db_url)
        if check and holds and db.current_revision_or_none(engine) is None:
            engine.dispose()
            raise StoreError(
                f"the catalog ({self.settings.db_url}) is missing or empty, but the store at "
                f"{self.home} holds adapters; run `lorahub fsck` to rebuild the catalog from "
                "the store's files"
            )
        db.upgrade(engine, self.home / "migrate.lock")
        upkeep.backfill_records(engine, self.records, self.home / "migrate.lock")
        return engine

    @contextlib.contextmanager
    def _writing(self) -> Iterator[tuple[Session, list[dict[str, Any]]]]:
        """A write transaction whose journal events (appended to the list it yields) are
        written under the catalog's write lock just before the commit, so the journal keeps
        commit order, and confirmed after it; if the commit fails they are marked aborted."""
        events: list[dict[str, Any]] = []
        ids: list[str] = []
        try:
            with db.write_session(self.engine) as s:
                yield s, events
                s.flush()
                ids = self.records.append(events)
        except BaseException:
            self.records.abort(ids)
            raise
        self.records.commit(ids)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ import

    def add(
        self,
        source: str | os.PathLike[str],
        *,
        name: str | None = None,
        base: str | os.PathLike[str] | None = None,
        force: bool = False,
    ) -> AddResult:
        """Import one adapter (a PEFT directory, or a kohya/diffusers file with ``base``).

        A PEFT folder carrying a ``lorahub.json`` (written by ``export``) keeps the identity
        it records, as ``pull`` does: the same digest, base and provenance, once its files
        are checked to make exactly that adapter. With ``base`` as well, the adapter is
        checked to fit that base; the recorded identity stays when that base is the one
        recorded (same content hash, or same signature where no hash was recorded), else the
        adapter is recorded for ``base``, with its recorded provenance: a new digest.

        Returns an ``AddResult`` whose status is ``added`` or ``present``.

        Raises:
            InvalidAdapter: the source is not a readable adapter; the store is unchanged.
            IntegrityError: the folder's files do not match its ``lorahub.json`` (edited
                after export); the store is unchanged.
        """
        from .formats import lorahub_json

        path = Path(source)
        adapter, fmt, unmapped = self._read(path, base)
        origin: dict[str, Any] = {"path": str(path.resolve()), "format": fmt}
        if unmapped:
            origin["unmapped_keys"] = unmapped
        folder = path if path.is_dir() else path.parent
        recorded = None
        if fmt.startswith("peft") and (folder / lorahub_json.FILENAME).is_file():
            recorded = lorahub_json.identity(
                adapter,
                folder / lorahub_json.FILENAME,
                str(folder),
                cause="The folder was edited after export, or its files are corrupt; to import "
                f"it as a new adapter, remove {folder / lorahub_json.FILENAME}",
            )
        stored: str | os.PathLike[str] | BaseRef | None = base
        if recorded is not None:
            stored = recorded.base
            if base is not None:
                given, _ = self._register_base_for(adapter, base, force)  # refuses a misfit
                same = (
                    given.content_hash == recorded.base.content_hash
                    if recorded.base.content_hash
                    else recorded.base.verified and given.signature == recorded.base.signature
                )
                stored = stored if same else base
        info, added = self.store(
            adapter,
            name=name,
            origin_kind="import",
            origin=origin,
            provenance=recorded.provenance if recorded else None,
            base=stored,
            force=force,
        )
        return AddResult(str(path), "added" if added else "present", info)

    def add_many(
        self,
        sources: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = False,
        name: str | None = None,
        base: str | os.PathLike[str] | None = None,
        force: bool = False,
    ) -> list[AddResult]:
        """Import every adapter found at ``sources``; one bad adapter does not stop the rest.

        Without a name, each adapter is named after its directory (relative to the folder
        given, with ``/`` turned into ``-``), tag ``latest``.
        """
        found: list[tuple[Path, str | None]] = []
        results: list[AddResult] = []
        for src in sources:
            root = Path(src)
            if not root.exists():
                results.append(AddResult(str(root), "refused", reason=f"{root} does not exist"))
                continue
            if not root.is_file() and not root.is_dir():
                reason = f"{root} is neither a regular file nor a folder"
                results.append(AddResult(str(root), "refused", reason=reason))
                continue
            if root.is_file() or peft.is_adapter_dir(root):
                own = root.resolve()
                if own.is_file() and own.name.startswith("adapter_model"):
                    own = own.parent
                # Named after the folder (or file) itself, however the path was spelled.
                label = own.stem if own.is_file() else own.name
                found.append((root, None if name else _default_name(Path(label))))
                continue
            dirs = peft.find_adapter_dirs(root, recursive=recursive)
            lacking = _weights_without_config(root, recursive)
            for folder in lacking:
                results.append(AddResult(str(folder), "refused", reason=_no_config(folder)))
            if not dirs and recursive:
                dirs = (
                    [p for p in sorted(root.rglob("*.safetensors")) if p.is_file()] if base else []
                )
            if not dirs and not lacking:
                hint = "" if recursive else " (use --recursive to search below it)"
                results.append(
                    AddResult(str(root), "refused", reason=f"no adapter found in {root}{hint}")
                )
            if not dirs:
                continue
            for d in dirs:
                rel = d.relative_to(root) if d != root else Path(d.name)
                found.append((d, None if name else _default_name(rel, root)))
        if name and len(found) > 1:
            raise InvalidReference(
                f"--name {name} names one adapter, but {len(found)} were found; "
                "leave it out to name each after its directory"
            )
        for path, default in found:
            try:
                results.append(self.add(path, name=name or default, base=base, force=force))
            except (LorahubError, OSError) as exc:
                results.append(AddResult(str(path), "refused", reason=str(exc)))
            except Exception as exc:  # a bug, but one adapter's bug must not stop the batch
                log.debug("adding %s failed", path, exc_info=True)
                reason = f"unexpected {type(exc).__name__}: {exc} (a lorahub bug; please report it)"
                results.append(AddResult(str(path), "refused", reason=reason))
        return results

    def _read(
        self, path: Path, base: str | os.PathLike[str] | None
    ) -> tuple[LoraAdapter, str, list[str]]:
        if not path.exists():
            raise InvalidAdapter(f"{path} does not exist")
        if not path.is_file() and not path.is_dir():  # a FIFO would block the read forever
            raise InvalidAdapter(f"{path} is neither a regular file nor a folder")
        if (
            path.is_file()
            and path.name in (peft.SAFETENSORS, peft.BIN)
            and peft.is_adapter_dir(path.parent)
        ):
            path = path.parent
        if path.is_dir():
            if not peft.is_adapter_dir(path):
                if _weights_without_config(path, recursive=False):
                    raise InvalidAdapter(_no_config(path))
                raise InvalidAdapter(
                    f"{path} holds no adapter ({peft.CONFIG} not found); "
                    "for a folder of adapters use `lorahub add --recursive`"
                )
            fmt = "peft-safetensors" if (path / peft.SAFETENSORS).is_file() else "peft-bin"
            return peft.read_peft_dir(path), fmt, []
        return self._read_file(path, base)

    def _read_file(
        self, path: Path, base: str | os.PathLike[str] | None
    ) -> tuple[LoraAdapter, str, list[str]]:
        """A single-file LoRA: kohya/sd-scripts or diffusers; kohya names need a base."""
        from .formats import kohya

        if path.suffix != ".safetensors":
            raise InvalidAdapter(
                f"{path} is not an adapter: give a PEFT directory or a .safetensors LoRA file"
            )
        keys, metadata = peft.read_safetensors_header(path)
        tensors = self._base_context(base).tensors if base is not None else None
        if kohya.is_kohya(keys):
            if tensors is None:
                raise InvalidAdapter(
                    f"{path} is a kohya LoRA: its module names can only be mapped with the base "
                    "model it was trained for; pass --base"
                )
            adapter, unmapped = kohya.read_kohya(path, tensors)
            return adapter, "kohya", unmapped
        if kohya.is_diffusers(keys, metadata):
            return kohya.read_diffusers_lora(path, tensors), "diffusers", []
        raise InvalidAdapter(
            f"{path} is neither a kohya nor a diffusers LoRA file; a PEFT adapter needs its "
            "adapter_config.json next to it"
        )

    def store(
        self,
        adapter: LoraAdapter,
        *,
        name: str | None = None,
        origin_kind: str,
        origin: Mapping[str, Any],
        provenance: Mapping[str, Any] | None = None,
        base: str | os.PathLike[str] | BaseRef | None = None,
        force: bool = False,
    ) -> tuple[AdapterInfo, bool]:
        """Store an in-memory adapter: blob first, then its rows, in one transaction.

        Returns the stored adapter and whether it was new.
        """
        ref = parse(name) if name else None
        if ref is not None and ref.name is None:
            raise InvalidReference(f"{name!r} is a digest; give a name such as 'my-adapter:v1'")
        base_ref, base_id = self._base_for(adapter, base, force)
        self.engine  # noqa: B018 - a new store's catalog exists before its first blob does
        source = _source_label(origin_kind, origin)

        def write(path: Path) -> None:
            peft.write_canonical(adapter, path)

        weights, size = self._put_blob(write, source)
        manifest = mf.build(adapter, weights, size, base_ref, provenance)
        if adapter.metadata:  # kohya's ss_* keys and the like: kept, but not identity
            origin = {**origin, "metadata": dict(adapter.metadata)}
        text = mf.encode(manifest).decode()
        digest = str(hash_bytes(text.encode()))
        # The manifest reaches the disk before its row commits: a lost catalog is rebuilt
        # from these files (`lorahub fsck`), and gc keeps the blobs they name.
        self.records.put_manifest(digest, text)

        def commit() -> tuple[AdapterInfo, bool]:
            with self._writing() as (s, events):
                row = q.adapter_by_digest(s, digest)  # the write lock is held from here
                if not self.blobs.path(weights).is_file():
                    # A gc that listed the blob before put_file refreshed it deleted it since;
                    # gc needs the write lock too, so once written again it stays.
                    self._put_blob(write, source)
                if self.records.manifest_text(digest) is None:  # the same, for the manifest
                    self.records.put_manifest(digest, text)
                added = row is None
                if row is None:
                    q.ensure_blob(s, str(weights), size)
                    row = q.insert_adapter(
                        s,
                        digest=digest,
                        manifest_text=text,
                        adapter=adapter,
                        weights_digest=str(weights),
                        size=size,
                        base=base_ref,
                        base_id=base_id,
                        origin_kind=origin_kind,
                        origin=origin,
                    )
                    events.append(upkeep.add_event(row))
                if ref is not None:
                    q.set_ref(s, ref.name, ref.tag, row)  # type: ignore[arg-type]
                    events.append(upkeep.ref_event("tag", ref.name, ref.tag, digest))  # type: ignore[arg-type]
                s.refresh(row)
                return q.to_info(row), added

        from sqlalchemy.exc import IntegrityError as RowExists

        try:
            info, added = commit()
        except RowExists:
            # A database without SQLite's IMMEDIATE lock (PostgreSQL) let another writer
            # insert the same adapter or blob first: the second try finds it present.
            info, added = commit()
        log.info("%s %s", "added" if added else "already present", digest)
        return info, added

    def _put_blob(self, write: Callable[[Path], None], source: str) -> tuple[Digest, int]:
        """``blobs.put_file``, a collision naming the adapters that use the stored blob."""
        from .errors import BlobCollision

        try:
            return self.blobs.put_file(write, source=source)
        except BlobCollision as exc:
            with db.read_session(self.engine) as s:
                users = [q.to_info(r) for r in health_q.adapters_using(s, exc.digest)]
            named = "; ".join(
                f"{', '.join(i.refs) or i.short} from {_source_label(i.origin_kind, i.origin)}"
                for i in users
            )
            raise BlobCollision(
                f"{exc}. The stored blob belongs to: {named or 'no adapter'}", exc.digest
            ) from None

    def _base_for(
        self, adapter: LoraAdapter, base: str | os.PathLike[str] | BaseRef | None, force: bool
    ) -> tuple[BaseRef, int | None]:
        """The base an adapter is recorded against; unverified from its config when not given."""
        if isinstance(base, BaseRef):
            return base, None
        if base is None:
            return mf.claimed_base(adapter), None
        return self._register_base_for(adapter, base, force)

    def _register_base_for(
        self, adapter: LoraAdapter, base: str | os.PathLike[str], force: bool
    ) -> tuple[BaseRef, int | None]:
        ctx = self._base_context(base)
        from . import compat

        report = compat.check(adapter, ctx.tensors)
        if not report.ok and not force:
            compat.require(report, "the adapter")
        return ctx.ref, ctx.id

    # ------------------------------------------------------------------ lookups

    def _find(self, s: Any, reference: str | Reference) -> Any:
        ref = parse(reference) if isinstance(reference, str) else reference
        return q.resolve_one(s, ref)

    def get(self, reference: str, *, base: str | os.PathLike[str] | None = None) -> AdapterInfo:
        """The adapter a reference names; with ``base``, the variant for that base (as
        :meth:`resolve`), which a name with one variant per base model needs.

        Raises:
            AdapterNotFound: nothing matches. AmbiguousReference: several do.
        """
        if base is not None:
            parse(reference)  # a stored reference only: a path here must not add anything
            return self.resolve(reference, base=base)
        with self._reading() as run:
            return reads.resolve_info(run, parse(reference))

    def list(
        self,
        filters: Iterable[str] | Mapping[str, str] = (),
        *,
        base: str | os.PathLike[str] | None = None,
        limit: int | None = None,
    ) -> list[AdapterInfo]:
        """Stored adapters, newest first; ``filters`` like ``["rank=16", "target=q_proj"]``;
        ``base`` keeps only those that fit that base model."""
        parsed = reads.parse_filters(filters)
        with self._reading() as run:
            infos = reads.list_infos(run, parsed, None if base else limit)
        if base is not None:
            infos = self._fitting(infos, base)[:limit] if limit else self._fitting(infos, base)
        return infos

    def _fitting(self, infos: list[AdapterInfo], base: str | os.PathLike[str]) -> list[AdapterInfo]:
        from . import compat

        ctx = self._base_context(base)
        keep = []
        for info in infos:
            report = compat.check(mf.skeleton(info.manifest), ctx.tensors)
            if report.ok:
                keep.append(info)
        return keep

    def load(self, reference: str) -> LoraAdapter:
        """The adapter's tensors and config, read from its blob."""
        info = self.get(reference)
        return self.load_info(info)

    def load_info(self, info: AdapterInfo) -> LoraAdapter:
        blob = Digest.parse(info.weights_digest)
        tensors, _ = peft.read_safetensors(self.blobs.checked_path(blob))
        return LoraAdapter.from_state_dict(info.config, tensors, info.origin.get("metadata"))

    # ------------------------------------------------------------------ base models

    def add_base(
        self,
        source: str | os.PathLike[str],
        *,
        revision: str | None = None,
        name: str | None = None,
        progress: Progress | None = None,
    ) -> BaseInfo:
        """Record a base model: its tensor table and signature from the safetensors headers,
        and (for local files) its content hash, computed once and cached.

        Args:
            source: a checkpoint folder, a ``.safetensors`` file, or a Hub repo id (looked up
                in the local Hugging Face cache, else read remotely, headers only).
            revision: branch, tag or commit for a Hub repo id.
            name: how to refer to it later (default: the repo id or the folder's name).
        """
        from .base import open_base

        if name is not None:
            validate_name(name)  # the rules adapter names follow: it is typed in commands too
        return self._record_base(open_base(source, revision=revision), source, name, progress)

    def _record_base(
        self,
        model: BaseModel,
        source: str | os.PathLike[str],
        name: str | None = None,
        progress: Progress | None = None,
    ) -> BaseInfo:
        from .base import content_hash

        digest = None
        if model.root is not None:
            digest = str(content_hash(model, cache_dir=self.home / "cache", progress=progress))
        label = name or model.repo_id or Path(os.fspath(source)).expanduser().resolve().name
        with db.write_session(self.engine) as s:
            row = bases_q.upsert(s, model, label, digest, rename=name is not None)
            self.records.put_base(upkeep.base_record(row))  # for `fsck`, before the commit
            return bases_q.to_info(row)

    def bases(self) -> list[BaseInfo]:
        """Every base model recorded, newest first."""
        with db.read_session(self.engine) as s:
            return [bases_q.to_info(r) for r in bases_q.all_rows(s)]

    def remove_base(self, reference: str) -> BaseInfo:
        """Forget a recorded base (by name, repo id, path or 12+ hex of a fingerprint).

        Adapters made for it are kept, with the name and fingerprints they recorded; only
        checks by this base's name stop working until it is recorded again.

        Raises:
            BaseModelError: nothing recorded matches. AmbiguousReference: several do.
        """
        with db.write_session(self.engine) as s:
            rows = bases_q.find(s, reference)
            if not rows:
                raise BaseModelError(
                    f"no recorded base matches {reference!r}; see `lorahub base ls`"
                )
            if len(rows) > 1:
                raise AmbiguousReference(
                    reference,
                    [f"{r.name} {r.content_hash or r.signature}" for r in rows],
                    hint="give its content hash",
                )
            info = bases_q.to_info(rows[0])
            record = upkeep.base_record(rows[0])
            bases_q.delete(s, rows[0])
        self.records.remove_base(record)
        return info

    def _base_context(
        self, base: str | os.PathLike[str], model: BaseModel | None = None
    ) -> _BaseContext:
        """A base's tensor table and identity: from the catalog when it is recorded under
        that name (no file access), else read from disk or the Hub and recorded."""
        text = os.fspath(base)
        if not Path(text).expanduser().exists():
            with self._reading() as run:
                rows = reads.find_bases(run, text)
                if len({r.content_hash or r.signature for r in rows}) > 1:
                    raise AmbiguousReference(
                        text,
                        [f"{r.name} {r.content_hash or r.signature}" for r in rows],
                        hint="give the base's path or its content hash",
                    )
                if rows:
                    info = rows[-1]
                    return _BaseContext(_tensors(run, info.id), _base_ref(info), info.id)
        info = self._record_base(model, text) if model is not None else self.add_base(text)
        with self._reading() as run:
            return _BaseContext(_tensors(run, info.id), _base_ref(info), info.id)

    def check(self, reference: str, *, base: str | os.PathLike[str]) -> CompatReport:
        """How the adapter fits ``base``: ``exact``, ``compatible`` or ``incompatible``,
        with every problem module named (expected vs found shapes)."""
        _, report = self._resolve(reference, base, strict=False)
        return report

    def resolve(self, reference: str, *, base: str | os.PathLike[str]) -> AdapterInfo:
        """The variant of ``name[:tag]`` for ``base``: the one recorded for that base's
        content, else one whose shapes fit (``info.match`` says which).

        Raises:
            IncompatibleAdapter: no variant fits; the message lists each and why.
        """
        info, _ = self._resolve(reference, base, strict=True)
        return info

    def _stored_ref(self, reference: str, base: str | os.PathLike[str] | None) -> str:
        """``reference`` itself, or for a path (``./my-adapter``) the ``@digest`` of that
        adapter once added to the store: merges and checks record digests, and adding is
        idempotent. Single files are read against ``base`` (kohya names need it)."""
        path = local_path(reference)
        if path is None:
            return reference
        if not path.exists():
            raise AdapterNotFound(
                reference, f"{reference} does not exist: no adapter file or folder there"
            )
        result = self.add(path, base=base if path.is_file() else None)
        assert result.adapter is not None
        return "@" + result.adapter.digest

    def _resolve(
        self,
        reference: str,
        base: str | os.PathLike[str],
        *,
        strict: bool,
        ctx: _BaseContext | None = None,
    ) -> tuple[AdapterInfo, CompatReport]:
        from . import compat

        ctx = ctx or self._base_context(base)
        ref = parse(self._stored_ref(reference, base))
        with self._reading() as run:
            infos, named = reads.candidate_infos(run, ref)
        if not infos:
            raise AdapterNotFound(ref.text)
        if not named and len(infos) > 1:  # a prefix of several digests, not base variants
            raise AmbiguousReference(ref.text, [i.digest for i in infos])
        reports = []
        for info in infos:
            report = compat.check(
                mf.skeleton(info.manifest),
                ctx.tensors,
                content_hash=ctx.ref.content_hash,
                recorded_hash=info.base.content_hash,
            )
            reports.append((info, report))
        for wanted in (compat.EXACT, compat.COMPATIBLE):
            # Prefer a variant recorded for this very architecture among equals.
            fits = [(i, r) for i, r in reports if r.status == wanted]
            fits.sort(key=lambda ir: ir[0].base.signature != ctx.ref.signature)
            if fits:
                info, report = fits[0]
                return replace(info, match=wanted), report
        if not strict and len(reports) == 1:
            return reports[0]
        lines = [
            f"variant {i.short} (base {i.base.name or i.base.variant or 'unknown'}): "
            + r.summary.replace("\n", "\n    ")
            for i, r in reports
        ]
        raise IncompatibleAdapter(
            f"no variant of {reference!r} fits {os.fspath(base)}:\n" + "\n".join(lines),
            reports[0][1],
        )

    # ------------------------------------------------------------------ merging

    def _merge_inputs(
        self,
        base: str | os.PathLike[str],
        adapters: str | Sequence[str],
        weights: Sequence[float] | None,
        progress: Progress | None = None,
    ) -> tuple[BaseModel, list[AdapterInfo], list[float], BaseRef]:
        from .base import open_base

        refs = [adapters] if isinstance(adapters, str) else list(adapters)
        if not refs:
            raise MergeError("nothing to merge: give at least one adapter")
        w = [1.0] * len(refs) if weights is None else [float(x) for x in weights]
        if len(w) != len(refs):
            raise MergeError(f"got {len(w)} weights for {len(refs)} adapters; give one each")
        model = open_base(base)
        if model.root is None:
            raise MergeError(
                f"{model.display} is not on this machine; merging needs its weights "
                f"(download it with `hf download {model.repo_id}`)"
            )
        ctx = self._base_context(base, model)  # headers read once, hash from the cache
        infos = [self._resolve(r, base, strict=True, ctx=ctx)[0] for r in refs]
        return model, infos, w, ctx.ref

    def merge(
        self,
        base: str | os.PathLike[str],
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        out: str | os.PathLike[str],
        device: str = "auto",
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        force: bool = False,
        progress: Progress | None = None,
    ) -> MergeResult:
        """Merge adapters (``w_i`` times each delta) into the base's weights and write a
        checkpoint folder ``transformers`` loads, streaming one tensor at a time.

        Each adapter is resolved for this base (the variant made for it, else one that
        fits) and checked before a byte is written.

        Example:
            >>> hub.merge("./Llama-3.2-1B", ["sql-expert", "tone"], [1.0, 0.5], out="./m")
        """
        from .merge import merge_to_dir, parse_size
        from .outputs import check_output

        # Checked before adapter folders are added: a refused output leaves no trace.
        given = [adapters] if isinstance(adapters, str) else list(adapters)
        inputs = [("an adapter", p) for p in map(local_path, given) if p is not None]
        if Path(base).expanduser().exists():
            inputs.append(("the base model", Path(base).expanduser()))
        check_output(out, force=force, inputs=inputs, store_home=self.home, kind="merge")
        model, infos, w, base_ref = self._merge_inputs(base, adapters, weights)
        loaded = [self.load_info(i) for i in infos]
        meta = _merge_metadata(base_ref, infos, w)
        return merge_to_dir(
            model,
            loaded,
            w,
            out=Path(out),
            device=device,
            dtype=dtype,
            max_shard_size=parse_size(max_shard_size),
            force=force,
            progress=progress,
            extra_metadata=meta,
            inputs=inputs,
        )

    def iter_merged(
        self,
        base: str | os.PathLike[str],
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        device: str = "auto",
        dtype: str | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the merged model's ``(name, tensor)`` pairs one by one, writing nothing:
        for loaders that take a state dict piece by piece."""
        from .merge import iter_merged

        model, infos, w, _ = self._merge_inputs(base, adapters, weights)
        loaded = [self.load_info(i) for i in infos]
        return iter_merged(model, loaded, w, device=device, dtype=dtype)

    def merged(
        self,
        base: str | os.PathLike[str],
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        device: str = "auto",
        dtype: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """The merged checkpoint for these inputs, made once and then served from
        ``<home>/merged/`` (least recently used entries go past ``merged_max_bytes``)."""
        from .merge import merge_to_dir, normalize_dtype

        model, infos, w, base_ref = self._merge_inputs(base, adapters, weights)
        dt = normalize_dtype(dtype) or "base"
        parts = [[i.digest, x] for i, x in zip(infos, w, strict=True)]
        key_doc = {"base": base_ref.content_hash, "adapters": parts, "dtype": dt}
        key = str(hash_bytes(canonical_json(key_doc)))
        out = self.home / "merged" / key.split(":")[1]
        with layout.merged_lock(self.home / "merged", key):
            with db.write_session(self.engine) as s:
                row = merged_q.get(s, key)
                if row is not None and Path(row.path).is_dir():
                    merged_q.touch(row)
                    return Path(row.path)
                if row is not None:
                    s.delete(row)
            result = merge_to_dir(
                model,
                [self.load_info(i) for i in infos],
                w,
                out=out,
                device=device,
                dtype=dtype,
                force=True,
                progress=progress,
                extra_metadata=_merge_metadata(base_ref, infos, w),
            )
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
            with db.write_session(self.engine) as s:
                merged_q.insert(s, info)
                victims = merged_q.over_cap(s, self.settings.merged_max_bytes, keep=key)
                gone = []
                for v in victims:
                    # Renamed aside before the row goes, so a process that rebuilds this
                    # key right after never has its fresh directory deleted under it.
                    aside = Path(v.path).with_name(f".{Path(v.path).name}.evicted-{os.getpid()}")
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(v.path, aside)
                        gone.append(aside)
                    s.delete(v)
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        return result.path

    def merged_list(self) -> list[MergedInfo]:
        """Merged checkpoints kept in the store, most recently used first."""
        with db.read_session(self.engine) as s:
            return [merged_q.to_info(r) for r in merged_q.all_rows(s)]

    def merged_remove(self, keys: Sequence[str] = (), *, all: bool = False) -> list[str]:
        """Delete merged checkpoints by key (or a 8+ hex prefix), or every one with ``all``."""
        removed = []
        with db.write_session(self.engine) as s:
            if all:
                rows = merged_q.all_rows(s)
            else:
                rows = []
                for k in dict.fromkeys(keys):  # a key given twice is removed once
                    if len(k.removeprefix("xxh128:")) < 8:
                        raise InvalidReference(f"merged key {k!r} is too short: give 8+ hex")
                    found = merged_q.find(s, k.lower())
                    if not found:
                        raise AdapterNotFound(k, f"no merged checkpoint matches {k!r}")
                    if len(found) > 1:
                        raise AmbiguousReference(k, [r.key for r in found])
                    rows.extend(r for r in found if r not in rows)
            for row in rows:
                removed.append((row.key, Path(row.path)))
                s.delete(row)
        for _, path in removed:
            shutil.rmtree(path, ignore_errors=True)  # its .lock stays: another process may hold it
        return [k for k, _ in removed]

    # ------------------------------------------------------------------ composition

    def compose(
        self,
        refs: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        method: str = "cat",
        rank: int | None = None,
        density: float | None = None,
        majority_sign: str = "total",
        seed: int | None = None,
        name: str | None = None,
        device: str = "cpu",
        allow_mixed_bases: bool = False,
    ) -> ComposeResult:
        """Make a new adapter from several and store it, with its provenance.

        ``cat`` and ``linear`` are exact; ``svd`` truncates the exact blend to ``rank``;
        ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` prune the deltas
        (``density``) and then refactor. The report gives each module's relative error.
        Composing the same inputs again gives the same digest (DARE is seeded).

        The parents must be made for one base: recorded for one architecture, naming one
        base model where they were not checked against one (and then fitting the recorded
        base of those that were), and agreeing on ``fan_in_fan_out``. The result is recorded
        for the base they agree on, and under ``name`` takes that base's place like an add.
        ``allow_mixed_bases`` lifts the check; the result then keeps only what they agree on.

        Raises:
            ComposeError: parents for different bases (each named with its base), bad
                method arguments, parents that cannot be combined.

        Example:
            >>> hub.compose(["sql", "tone"], [1.0, 0.5], method="svd", rank=32, name="blend")
        """
        from . import compat
        from .compose import ParentBase, compose, parents_base

        infos = [self.get(self._stored_ref(r, None)) for r in refs]  # a path is added first
        parents = []
        for r, i in zip(refs, infos, strict=True):
            claimed = i.config.get("base_model_name_or_path")
            claimed = claimed if isinstance(claimed, str) else None
            parents.append(ParentBase(r, i.base, claimed, i.config.get("fan_in_fan_out") is True))
        base = parents_base(parents, allow_mixed=allow_mixed_bases)
        loose = [(p, i) for p, i in zip(parents, infos, strict=True) if not i.base.verified]
        if base.verified and loose:
            # The unverified parents were never checked against the base the result claims
            # (one signature, one tensor table: any base row of it will do).
            with db.read_session(self.engine) as s:
                rows = [
                    r for r in bases_q.find(s, str(base.signature)) if r.signature == base.signature
                ]
                table = bases_q.tensor_table(rows[0]) if rows else {}
            misfits = [
                (p, fit)
                for p, i in loose
                if table and not (fit := compat.check(mf.skeleton(i.manifest), table)).ok
            ]
            if misfits and not allow_mixed_bases:
                p, fit = misfits[0]
                raise ComposeError(
                    f"{p.label} was not recorded for a base and does not fit "
                    f"{base.name or base.variant}, the base the other parents were recorded "
                    f"for: {fit.summary}\nPass --allow-mixed-bases to compose them anyway"
                )
            if misfits:  # the result cannot claim a base some of it does not fit
                base = BaseRef(base.name)
        adapter, report = compose(
            [self.load_info(i) for i in infos],
            weights,
            method=method,
            rank=rank,
            density=density,
            majority_sign=majority_sign,
            seed=seed,
            device=device,
        )
        provenance = {
            "kind": "compose",
            "parents": [i.digest for i in infos],
            "weights": list(report.weights),
            "method": method,
            "rank": rank,
            "density": density,
            "majority_sign": majority_sign if method in ("ties", "dare_ties") else None,
            "seed": seed,
        }
        info, added = self.store(
            adapter,
            name=name,
            origin_kind="compose",
            origin={
                "method": method,
                "parents": [i.refs[0] if i.refs else i.digest for i in infos],
            },
            provenance=provenance,
            base=base,
        )
        return ComposeResult(info, report, added)

    # ------------------------------------------------------------------ names

    def tag(self, reference: str, new: str) -> AdapterInfo:
        """Give the adapter ``reference`` names another name ``new`` (``name[:tag]``)."""
        target = parse(new)
        if target.name is None:
            raise InvalidReference(
                f"{new!r} is a digest; a tag must be a name like 'sql-expert:prod'"
            )
        with self._writing() as (s, events):
            row = self._find(s, reference)
            q.set_ref(s, target.name, target.tag, row)
            events.append(upkeep.ref_event("tag", target.name, target.tag, row.digest))
            s.refresh(row)
            return q.to_info(row)

    def remove(self, reference: str, *, base: str | os.PathLike[str] | None = None) -> list[str]:
        """Remove a name (or, for a digest, the adapter and all its names); with ``base``,
        only from the variant for that base.

        An adapter left without names is deleted from the catalog; its blob stays until
        ``gc`` (other adapters may share it). Returns the names removed.
        """
        ref = parse(reference)
        digest = None
        if base is not None:
            chosen = self.resolve(reference, base=base)
            if chosen.match != "exact":  # removing is for the variant made for this base only
                raise AdapterNotFound(
                    reference,
                    f"{reference!r} has no variant recorded for {os.fspath(base)} (the one that "
                    f"fits, {chosen.short}, was made for another base); nothing was removed",
                )
            digest = chosen.digest
        removed: list[str] = []
        with self._writing() as (s, events):
            row = self._find(s, ref if digest is None else parse("@" + digest))
            by_name = ref.name is not None and any(
                r.name == ref.name and r.tag == ref.tag for r in row.refs
            )
            if by_name:
                q.remove_ref(s, ref.name, ref.tag, row.id)  # type: ignore[arg-type]
                removed.append(format_ref(ref.name, ref.tag))  # type: ignore[arg-type]
                events.append(upkeep.ref_event("untag", ref.name, ref.tag, row.digest))  # type: ignore[arg-type]
                s.expire(row)
                if q.ref_count(s, row.id) == 0:
                    q.delete_adapter(s, row)
                    events.append({"op": "rm", "digest": row.digest})
            else:
                removed.extend(format_ref(r.name, r.tag) for r in row.refs)
                q.delete_adapter(s, row)
                events.append({"op": "rm", "digest": row.digest})
            return removed or [row.digest]

    # ------------------------------------------------------------------ export

    def export(
        self,
        reference: str,
        out: str | os.PathLike[str],
        *,
        force: bool = False,
        base: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Write a directory ``PeftModel.from_pretrained`` loads: config, weights, model card.

        The directory appears complete or not at all. An empty folder is filled; with
        ``force`` an earlier lorahub output holding nothing else is replaced; anything else
        at ``out`` (a link, the current directory, other files) is refused with ``StoreError``.
        ``base`` picks a name's variant.
        """
        import functools

        from .card import adapter_card
        from .outputs import EXPORT_FILES, check_output

        info = self.get(reference, base=base)
        dest = Path(out).expanduser()
        given = Path(base).expanduser() if base is not None else None
        inputs = [("the base model", given)] if given is not None and given.exists() else []
        check = functools.partial(
            check_output, dest, force=force, inputs=inputs, store_home=self.home, kind="export"
        )
        check()

        blob = self.blobs.checked_path(Digest.parse(info.weights_digest))  # before any write
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            os.chmod(tmp, 0o777 & ~current_umask())  # as mkdir would make it, not 0700
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
        try:
            shutil.copyfile(blob, tmp / peft.SAFETENSORS)
            peft.write_config(info.config, tmp)
            (tmp / "README.md").write_text(adapter_card(info))
            text = mf.lorahub_json_text(info.digest, info.manifest, files=EXPORT_FILES)
            (tmp / "lorahub.json").write_text(text)
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            publish_dir(tmp, dest, replace=check())  # checked again: files may have come
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ------------------------------------------------------------------ health

    def verify(self, *, quick: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Check the catalog database's own integrity, re-hash every blob (or, ``quick``,
        check existence and size), and check every adapter row against its blob, its
        manifest and the store's manifest file; adapters the files hold and the catalog
        lacks are reported too (``fsck`` restores them)."""
        return upkeep.verify_store(
            self.engine, self.blobs, self.records, quick=quick, progress=progress
        )

    def gc(
        self, *, grace: float = DEFAULT_GRACE_S, dry_run: bool = False, force: bool = False
    ) -> GcReport:
        """Delete blobs no adapter uses, stale temp files and merge leftovers, older than
        ``grace`` seconds.

        The grace period protects a concurrent ``add`` that has published a blob and not
        yet committed the row that uses it. A blob stays while the catalog or any manifest
        file in the store needs it; gc refuses to run on a damaged or inconsistent catalog,
        and, unless ``force``, when it would delete blobs no recorded removal accounts for
        while the catalog is empty or they are most of the store.

        Raises:
            StoreError: the catalog cannot be trusted to say what is unused.
        """
        return upkeep.collect_garbage(
            self.engine,
            self.blobs,
            self.records,
            self.home / "merged",
            grace=grace,
            dry_run=dry_run,
            force=force,
        )

    def fsck(self, *, dry_run: bool = False, quick: bool = False) -> upkeep.FsckReport:
        """Repair the store from its own files: a SQLite catalog that cannot be read is
        moved aside (``lorahub.db.damaged-<time>``) and a damaged index rebuilt; then every
        adapter, name and base the store's records hold and the catalog lacks is restored,
        missing manifest files are rewritten, and damaged or missing blobs are fetched
        again from the adapter's source (its folder, or its Hub repo) where possible, else
        moved to ``<home>/quarantine/``. Nothing is deleted.

        Example:
            >>> hub.fsck().adapters_restored  # doctest: +SKIP
        """
        aside, reindexed = None, False
        if self.settings.database_url is None:
            self.close()
            aside, reindexed = upkeep.set_aside_if_damaged(
                self.home / "lorahub.db", dry_run=dry_run
            )
        if dry_run and aside:
            return upkeep.FsckReport(catalog_set_aside=aside, dry_run=True)
        self._engine = self._open_catalog(check=False)
        report = upkeep.fsck(
            self._engine,
            self.blobs,
            self.records,
            dry_run=dry_run,
            quick=quick,
            refetch=self._refetch,
            quarantine=self.home / "quarantine",
        )
        return replace(report, catalog_set_aside=aside, reindexed=reindexed)

    def _refetch(self, weights: str, origin_kind: str, origin: Mapping[str, Any]) -> bool:
        """Write blob ``weights`` again from where its adapter came from: the folder or
        file it was imported from, or the Hub repo at the commit it was pulled from.
        False when that source is gone or now holds something else."""
        if origin_kind == "import" and origin.get("path"):
            path = Path(str(origin["path"]))
            if not path.exists() or origin.get("format") == "kohya":
                return False  # kohya names were mapped with a base: not redone here
            adapter, _, _ = self._read(path, None)
        elif origin_kind == "pull" and origin.get("repo_id"):
            from . import remote

            got = remote.download_adapter(
                str(origin["repo_id"]),
                revision=str(origin.get("commit") or origin.get("revision")),
                subfolder=origin.get("subfolder"),
            )
            adapter = remote.read_adapter(got)
        else:
            return False

        def write(path: Path) -> None:
            peft.write_canonical(adapter, path)

        self.blobs.put_file(write, expect=Digest.parse(weights), source=str(origin))
        return True

    # ------------------------------------------------------------------ remote

    def push(
        self,
        reference: str,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        tag: str | None = None,
        path_in_repo: str | None = None,
        base: str | os.PathLike[str] | None = None,
    ) -> PushResult:
        """Push an adapter to a Hugging Face Hub repo, as a folder PEFT loads.

        Uploads ``adapter_config.json``, ``adapter_model.safetensors``, a model card and
        ``lorahub.json``; creates the repo (``private`` applies then) and the branch
        ``revision`` if needed, and tags the commit with ``tag``. Files already there are not
        uploaded again, and an unchanged repo gets no commit. The token is huggingface_hub's
        own (``HF_TOKEN``, ``hf auth login``).

        Returns:
            ``lorahub.remote.PushResult``: commit sha and URL, bytes uploaded.

        Raises:
            RemoteError: no token or no write access, a tag already used, an unreachable Hub.

        >>> hub.push("sql-expert:v1", "myorg/sql-expert", tag="v1").commit_url  # doctest: +SKIP
        """
        from . import remote

        info = self.get(reference, base=base)
        weights = self.blobs.path(Digest.parse(info.weights_digest))
        return remote.push_adapter(
            info,
            weights,
            repo_id,
            private=private,
            revision=revision,
            tag=tag,
            path_in_repo=path_in_repo,
        )

    def pull(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        name: str | None = None,
    ) -> AdapterInfo:
        """Import a PEFT adapter from a Hub repo (``org/name`` or ``org/name@revision``).

        Any PEFT adapter repo works; only its adapter files are downloaded, through the shared
        Hugging Face cache. With ``lorahub.json`` the imported adapter must have the digest it
        states, else ``IntegrityError`` and nothing is stored. ``name`` defaults to
        ``org/name:<revision or latest>``; the origin (endpoint, repo, revision, commit) is
        recorded in the catalog.

        Raises:
            RemoteError: missing, private or gated repo, missing revision, hostile answers.
            InvalidAdapter: no adapter there, or unreadable files. IntegrityError: corrupt data.

        >>> hub.pull("myorg/sql-expert@v1", name="sql-expert").digest  # doctest: +SKIP
        """
        from . import remote

        repo_id, revision = remote.split_repo_spec(repo_id, revision)
        got = remote.download_adapter(repo_id, revision=revision, subfolder=subfolder)
        adapter = remote.read_adapter(got)
        base, provenance = remote.identity(adapter, got)
        info, _ = self.store(
            adapter,
            name=name or remote.default_name(repo_id, revision, got.subfolder),
            origin_kind="pull",
            origin=got.origin(),
            provenance=provenance,
            base=base,
        )
        return info


@dataclass(frozen=True)
class _BaseContext:
    tensors: Mapping[str, TensorInfo]
    ref: BaseRef
    id: int | None


def _weights_without_config(root: Path, recursive: bool) -> list[Path]:
    """Folders (``root``, or any below it with ``recursive``) holding PEFT weights but no
    ``adapter_config.json``: an adapter copied without its config."""
    names = (peft.SAFETENSORS, peft.BIN)
    if recursive:
        found = {p.parent for n in names for p in root.rglob(n) if p.is_file()}
    else:
        found = {root} if any((root / n).is_file() for n in names) else set()
    return sorted(f for f in found if not peft.is_adapter_dir(f))


def _no_config(folder: Path) -> str:
    weights = next(n for n in (peft.SAFETENSORS, peft.BIN) if (folder / n).is_file())
    return (
        f"{folder} has {weights} but no {peft.CONFIG}; PEFT saves both: copy the config that "
        "was saved with these weights into the folder"
    )


def _source_label(origin_kind: str, origin: Mapping[str, Any]) -> str:
    """Where an adapter came from, for messages: a path, ``repo@revision``, or its kind."""
    if origin.get("repo_id"):
        return f"{origin['repo_id']}@{origin.get('revision') or origin.get('commit')}"
    return str(origin.get("path") or origin_kind)


def _tensors(run: reads.Run, base_id: int) -> dict[str, TensorInfo]:
    from .base import TensorInfo

    return {n: TensorInfo(n, d, s) for n, d, s in reads.tensor_table(run, base_id)}


def _base_ref(info: BaseInfo) -> BaseRef:
    return BaseRef(info.repo_id or info.name, info.revision, info.signature, info.content_hash)


def open(home: str | os.PathLike[str] | None = None) -> Hub:
    """Open (creating if needed) the store at ``home``."""
    return Hub(home)


def _merge_metadata(
    base: BaseRef, infos: Sequence[AdapterInfo], weights: Sequence[float]
) -> dict[str, Any]:
    return {
        "base_name": base.name,
        "base_signature": base.signature,
        "base_content_hash": base.content_hash,
        "adapters": [
            {"digest": i.digest, "refs": list(i.refs), "weight": w}
            for i, w in zip(infos, weights, strict=True)
        ],
    }


def _default_name(rel: Path, root: Path | None = None) -> str | None:
    """A name from a folder path: accents dropped (``ünïcode`` -> ``unicode``), anything
    else outside the name alphabet turned into ``-``; None when nothing usable is left."""
    import unicodedata

    text = "-".join(p for p in rel.parts if p not in ("", ".")) or (root.name if root else "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:128]
    try:
        return validate_name(text) if text else None
    except InvalidReference:
        return None
