"""Putting adapters into the store: blob first, then its manifest file, then its catalog
rows, in one transaction; and importing them from folders and files on disk.

The order is what makes a crash safe: a blob with no row is collected by ``gc``; a row is
never committed before the blob and manifest it names are on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import manifest as mf
from . import sources
from .adapter import LoraAdapter
from .aliases import Progress, StrPath
from .digest import Digest, hash_bytes
from .errors import InvalidReference, LorahubError
from .formats import peft
from .info import AdapterInfo, AddResult
from .lazy import lazy_module
from .manifest import BaseRef
from .refs import parse

if TYPE_CHECKING:
    from . import upkeep
    from .catalog import db
    from .catalog import queries as q
    from .resolution import Resolver
    from .store import Store
else:
    upkeep = lazy_module("lorahub.upkeep")
    db = lazy_module("lorahub.catalog.db")
    q = lazy_module("lorahub.catalog.queries")

log = logging.getLogger(__name__)

# Where a base is given: a name, path or repo id, or a recorded ``BaseRef`` (pull, compose).
BaseArg = StrPath | BaseRef | None


class Importer:
    """Stores adapters in ``store``; bases given by name or path are resolved (and
    recorded) through ``resolver``, and adapters checked to fit them."""

    def __init__(self, store: Store, resolver: Resolver) -> None:
        self.store = store
        self.resolver = resolver

    def add(
        self,
        source: StrPath,
        *,
        name: str | None = None,
        base: StrPath | None = None,
        force: bool = False,
    ) -> AddResult:
        """Import one adapter (a PEFT directory, or a kohya/diffusers file with ``base``).

        A PEFT folder carrying a ``lorahub.json`` (written by ``export``) keeps the identity
        it records, as ``pull`` does: the same digest, base and provenance, once its files
        are checked to make exactly that adapter. With ``base`` as well, the adapter is
        checked to fit that base; the recorded identity stays when that base is the one
        recorded (same content hash, or same signature where no hash was recorded), else the
        adapter is recorded for ``base``, with its recorded provenance: a new digest.
        """
        from .formats import lorahub_json

        path = Path(source)
        adapter, fmt, unmapped = sources.read(path, base, self.resolver.base_tensors)
        origin: dict[str, Any] = {"path": str(path.resolve()), "format": fmt}
        if unmapped:
            origin["unmapped_keys"] = unmapped
        folder = path if path.is_dir() else path.parent
        if path.is_dir():  # the card of the folder, not of whatever holds a lone file
            from .card import ORIGIN_KEY, README, read_card

            card = read_card(folder / README)
            if card is not None:  # kept beside the identity (origin), never part of it
                origin[ORIGIN_KEY] = card
        recorded = None
        if fmt.startswith("peft") and (folder / lorahub_json.FILENAME).is_file():
            recorded = lorahub_json.identity(
                adapter,
                folder / lorahub_json.FILENAME,
                str(folder),
                cause="The folder was edited after export, or its files are corrupt; to import "
                f"it as a new adapter, remove {folder / lorahub_json.FILENAME}",
            )
        stored: BaseArg = base
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
        info, added = self.store_adapter(
            adapter,
            name=name,
            origin_kind="import",
            origin=origin,
            provenance=recorded.provenance if recorded else None,
            base=stored,
            force=force,
        )
        return AddResult(str(path), "added" if added else "present", info)

    def add_found(
        self,
        found: sources.Found,
        *,
        name: str | None,
        base: StrPath | None,
        force: bool,
        progress: Progress | None = None,
        on_result: Callable[[AddResult], None] | None = None,
    ) -> list[AddResult]:
        """Add every adapter :func:`sources.discover` found, after the sources it refused;
        one bad adapter does not stop the rest. Returns every result, in that order.

        ``on_result`` gets each result as soon as it is known (the refused sources first),
        so a caller can report it before the next adapter is read; ``progress`` gets
        ``(adapters_done, adapters_found)``.
        """
        if name and len(found.adapters) > 1:
            raise InvalidReference(
                f"--name {name} names one adapter, but {len(found.adapters)} were found; "
                "leave it out to name each after its directory"
            )
        results: list[AddResult] = []

        def report(result: AddResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        for refused in found.refused:
            report(refused)
        total = len(found.adapters)
        if progress is not None:
            progress(0, total)
        for done, (path, default) in enumerate(found.adapters, 1):
            try:
                result = self.add(path, name=name or default, base=base, force=force)
            except (LorahubError, OSError) as exc:
                result = AddResult(str(path), "refused", reason=str(exc))
            except Exception as exc:  # a bug, but one adapter's bug must not stop the batch
                log.debug("adding %s failed", path, exc_info=True)
                reason = f"unexpected {type(exc).__name__}: {exc} (a lorahub bug; please report it)"
                result = AddResult(str(path), "refused", reason=reason)
            report(result)
            if progress is not None:
                progress(done, total)
        return results

    def store_adapter(
        self,
        adapter: LoraAdapter,
        *,
        name: str | None = None,
        origin_kind: str,
        origin: Mapping[str, Any],
        provenance: Mapping[str, Any] | None = None,
        base: BaseArg = None,
        force: bool = False,
    ) -> tuple[AdapterInfo, bool]:
        """Store an in-memory adapter: blob first, then its rows, in one transaction.

        Returns the stored adapter and whether it was new.
        """
        ref = parse(name) if name else None
        if ref is not None and ref.name is None:
            raise InvalidReference(f"{name!r} is a digest; give a name such as 'my-adapter:v1'")
        base_ref, base_id = self._base_for(adapter, base, force)
        self.store.engine  # noqa: B018 - a new store's catalog exists before its first blob does
        source = sources.source_label(origin_kind, origin)

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
        self.store.records.put_manifest(digest, text)

        def commit() -> tuple[AdapterInfo, bool]:
            with self.store.writing() as (s, events):
                row = q.adapter_by_digest(s, digest)  # the write lock is held from here
                if not self.store.blobs.exists(weights):
                    # A gc that listed the blob before put_file refreshed it deleted it since;
                    # gc needs the write lock too, so once written again it stays.
                    self._put_blob(write, source)
                if self.store.records.manifest_text(digest) is None:  # the same, for the manifest
                    self.store.records.put_manifest(digest, text)
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
                if ref is not None and ref.name is not None:  # a digest was refused above
                    q.set_ref(s, ref.name, ref.tag, row)
                    events.append(upkeep.ref_event("tag", ref.name, ref.tag, digest))
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

    def pull(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        name: str | None = None,
    ) -> AdapterInfo:
        """Download a PEFT adapter from a Hub repo (``org/name`` or ``org/name@revision``)
        through the shared Hugging Face cache, only its adapter files, and store it. With a
        ``lorahub.json`` it must have the digest and identity stated there. ``name`` defaults
        to ``org/name:<revision or latest>``; the origin (endpoint, repo, commit) is recorded.

        Raises:
            RemoteError: missing, private or gated repo, missing revision, hostile answers
                (``RemoteNotFound`` for what the Hub says is not there).
            InvalidAdapter: no adapter there, or unreadable files.
            CorruptData: a download cut short or altered, files that differ from their
                ``lorahub.json``.
        """
        from . import remote

        repo_id, revision = remote.split_repo_spec(repo_id, revision)
        got = remote.download_adapter(repo_id, revision=revision, subfolder=subfolder)
        adapter = remote.read_adapter(got)
        base, provenance = remote.identity(adapter, got)
        info, _ = self.store_adapter(
            adapter,
            name=name or remote.default_name(repo_id, revision, got.subfolder),
            origin_kind="pull",
            origin=got.origin(),
            provenance=provenance,
            base=base,
        )
        return info

    def refetch(self, weights: str, origin_kind: str, origin: Mapping[str, Any]) -> bool:
        """Write blob ``weights`` again from where its adapter came from: the folder or
        file it was imported from, or the Hub repo at the commit it was pulled from.
        False when that source is gone or now holds something else (``fsck``'s repair)."""
        if origin_kind == "import" and origin.get("path"):
            path = Path(str(origin["path"]))
            if not path.exists() or origin.get("format") == "kohya":
                return False  # kohya names were mapped with a base: not redone here
            adapter, _, _ = sources.read(path, None, self.resolver.base_tensors)
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

        self.store.blobs.put_file(write, expect=Digest.parse(weights), source=str(origin))
        return True

    def _put_blob(self, write: Callable[[Path], None], source: str) -> tuple[Digest, int]:
        """``blobs.put_file``, a collision naming the adapters that use the stored blob."""
        from .errors import BlobCollision

        try:
            return self.store.blobs.put_file(write, source=source)
        except BlobCollision as exc:
            with db.read_session(self.store.engine) as s:
                users = [q.to_info(r) for r in q.adapters_using(s, exc.digest)]
            label = sources.source_label
            named = "; ".join(
                f"{', '.join(i.refs) or i.short} from {label(i.origin_kind, i.origin)}"
                for i in users
            )
            raise BlobCollision(
                f"{exc}. The stored blob belongs to: {named or 'no adapter'}", exc.digest
            ) from None

    def _base_for(
        self, adapter: LoraAdapter, base: BaseArg, force: bool
    ) -> tuple[BaseRef, int | None]:
        """The base an adapter is recorded against; unverified from its config when not given."""
        if isinstance(base, BaseRef):
            return base, None
        if base is None:
            return mf.claimed_base(adapter), None
        return self._register_base_for(adapter, base, force)

    def _register_base_for(
        self, adapter: LoraAdapter, base: StrPath, force: bool
    ) -> tuple[BaseRef, int | None]:
        ctx = self.resolver.base_context(base)
        from . import compat

        report = compat.check(adapter, ctx.tensors)
        if not report.ok and not force:
            compat.require(report, "the adapter")
        return ctx.ref, ctx.id
