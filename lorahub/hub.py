"""``Hub``: the public Python API, a facade whose methods delegate to the module that owns
each concern: ``store`` (files, catalog), ``sources`` and ``storing`` (import), ``resolution``
(a name's variant for a base), ``base_registry``, ``naming``, ``merging``, ``merged_cache``,
``composing``, ``export``, ``remote`` (push, pull) and ``upkeep`` (verify, gc, fsck).

>>> import lorahub
>>> hub = lorahub.open(home="/tmp/lorahub-demo")
>>> info = hub.add("./my-peft-adapter", name="sql-expert:v1").adapter
>>> hub.export("sql-expert:v1", "./out")
"""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import base_registry, merging, naming
from .adapter import LoraAdapter
from .aliases import Progress, StrPath
from .catalog import reads
from .info import AdapterInfo, AddResult, BaseInfo
from .lazy import lazy_module
from .merged_cache import MergedCache
from .refs import parse
from .resolution import Resolver
from .settings import Settings, load
from .sources import discover
from .store import Store
from .storing import BaseArg, Importer

if TYPE_CHECKING:
    import torch
    from sqlalchemy import Engine

    from . import tokens as access
    from . import upkeep
    from .base import BaseModel
    from .compat import CompatReport
    from .info import ComposeResult, ExportResult, GcReport, MergedInfo, VerifyReport
    from .manifest import BaseRef
    from .merge import MergeResult
    from .metadata import AdapterMetadata
    from .remote import PushResult
    from .serving import ServingExport
else:  # SQLAlchemy, behind these, takes longer to import than `show` may take in all
    upkeep = lazy_module("lorahub.upkeep")
    access = lazy_module("lorahub.tokens")

DEFAULT_GRACE_S = 3600.0


class Hub:
    """A lorahub store: blobs on disk, a catalog in SQL.

    Args:
        home: the store directory; default ``LORAHUB_HOME`` or the user data directory.
        settings: overrides everything else (tests, embedding).
    """

    def __init__(self, home: StrPath | None = None, *, settings: Settings | None = None):
        self._store = Store(settings or load(home))
        self.settings = self._store.settings
        self.home = self._store.home
        self.blobs = self._store.blobs
        self.records = self._store.records
        self._resolver = Resolver(self._store, self.add)
        self._importer = Importer(self._store, self._resolver)
        self._merged = MergedCache(self._store, self._resolver)

    def __repr__(self) -> str:
        return f"Hub(home={str(self.home)!r})"

    @property
    def engine(self) -> Engine:
        """The catalog engine, migrated on first use."""
        return self._store.engine

    @property
    def _engine(self) -> Engine | None:
        """The engine if the catalog was opened through SQLAlchemy yet, else None."""
        return self._store.engine_or_none

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        source: StrPath,
        *,
        name: str | None = None,
        base: StrPath | None = None,
        force: bool = False,
    ) -> AddResult:
        """Import one adapter (a PEFT directory, or a kohya/diffusers file with ``base``);
        returns an ``AddResult`` whose status is ``added`` or ``present``. A folder with a
        ``lorahub.json`` keeps the identity it records (see :meth:`lorahub.storing.Importer.add`).

        Raises:
            InvalidAdapter: the source is not a readable adapter; the store is unchanged.
            IntegrityError: the folder's files do not match its ``lorahub.json`` (edited
                after export); the store is unchanged.
        """
        return self._importer.add(source, name=name, base=base, force=force)

    def add_many(
        self,
        sources: Sequence[StrPath],
        *,
        recursive: bool = False,
        name: str | None = None,
        base: StrPath | None = None,
        force: bool = False,
        progress: Progress | None = None,
        on_result: Callable[[AddResult], None] | None = None,
    ) -> list[AddResult]:
        """Import every adapter found at ``sources``; one bad adapter does not stop the rest.
        Without ``name``, each is named as :func:`lorahub.sources.discover` says, tag ``latest``.
        ``on_result`` gets each result as it finishes; ``progress`` gets ``(done, found)``.
        """
        found = discover(sources, recursive=recursive, named=bool(name), with_base=bool(base))
        return self._importer.add_found(
            found, name=name, base=base, force=force, progress=progress, on_result=on_result
        )

    def store(
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
        return self._importer.store_adapter(
            adapter,
            name=name,
            origin_kind=origin_kind,
            origin=origin,
            provenance=provenance,
            base=base,
            force=force,
        )

    def get(self, reference: str, *, base: StrPath | None = None) -> AdapterInfo:
        """The adapter a reference names; with ``base``, the variant for that base (as
        :meth:`resolve`), which a name with one variant per base model needs.

        Raises:
            AdapterNotFound: nothing matches. AmbiguousReference: several do.
        """
        if base is not None:
            parse(reference)  # a stored reference only: a path here must not add anything
            return self.resolve(reference, base=base)
        return self._store.find_info(reference)

    def metadata(self, reference: str, *, base: StrPath | None = None) -> AdapterMetadata:
        """The adapter's safetensors header metadata (the imported file's, kept outside its
        identity, and its blob's own) and each header rank or alpha that disagrees with its
        config (:func:`lorahub.metadata.disagreements`).

        >>> for d in hub.metadata("style:v1").disagreements:  # doctest: +SKIP
        ...     print(d.message)
        """
        from . import metadata
        from .digest import Digest

        info = self.get(reference, base=base)
        blob = self._store.blobs.checked_path(Digest.parse(info.weights_digest))
        return metadata.of_adapter(info, blob)

    def list_adapters(
        self,
        filters: Iterable[str] | Mapping[str, str] = (),
        *,
        base: StrPath | None = None,
        limit: int | None = None,
    ) -> list[AdapterInfo]:
        """Stored adapters, newest first; ``filters`` like ``["rank=16", "target=q_proj"]``;
        ``base`` keeps only those that fit that base model."""
        parsed = reads.parse_filters(filters)
        with self._store.reading() as run:
            infos = reads.list_infos(run, parsed, None if base else limit)
        if base is not None:
            infos = self._resolver.fitting(infos, base)
            infos = infos[:limit] if limit else infos
        return infos

    def load(self, reference: str) -> LoraAdapter:
        """The adapter's tensors and config, read from its blob."""
        return self.load_info(self.get(reference))

    def load_info(self, info: AdapterInfo) -> LoraAdapter:
        return self._store.load_adapter(info)

    def add_base(
        self,
        source: StrPath,
        *,
        revision: str | None = None,
        name: str | None = None,
        progress: Progress | None = None,
    ) -> BaseInfo:
        """Record a base model (a checkpoint folder, a ``.safetensors`` file, or a Hub repo
        id at ``revision``, from the local cache else read remotely, headers only): its
        tensor table and signature, and for local files its content hash, computed once and
        cached. ``name`` defaults to the repo id or the folder's name."""
        return base_registry.add_base(
            self._store, source, revision=revision, name=name, progress=progress
        )

    def bases(self) -> list[BaseInfo]:
        """Every base model recorded, newest first."""
        return base_registry.list_bases(self._store)

    def remove_base(self, reference: str) -> BaseInfo:
        """Forget a recorded base (by name, repo id, path or 12+ hex of a fingerprint);
        adapters made for it keep the name and fingerprints they recorded.

        Raises:
            BaseModelError: nothing recorded matches. AmbiguousReference: several do.
        """
        return base_registry.remove_base(self._store, reference)

    def check(self, reference: str, *, base: StrPath) -> CompatReport:
        """How the adapter fits ``base``: ``exact``, ``compatible`` or ``incompatible``,
        with every problem module named (expected vs found shapes)."""
        return self._resolver.resolve(reference, base, strict=False)[1]

    def resolve(self, reference: str, *, base: StrPath) -> AdapterInfo:
        """The variant of ``name[:tag]`` for ``base``: the one recorded for that base's
        content, else one whose shapes fit (``info.match`` says which).

        Raises:
            IncompatibleAdapter: no variant fits; the message lists each and why.
        """
        return self._resolver.resolve(reference, base, strict=True)[0]

    def merge(
        self,
        base: StrPath,
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        out: StrPath,
        device: str = "auto",
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        force: bool = False,
        progress: Progress | None = None,
    ) -> MergeResult:
        """Merge adapters (``w_i`` times each delta) into the base's weights and write a
        checkpoint folder ``transformers`` loads; each adapter is resolved for this base and
        checked first. Options and errors: :func:`lorahub.merge.merge_to_dir`.

        >>> hub.merge("./Llama-3.2-1B", ["sql-expert", "tone"], [1.0, 0.5], out="./m")
        """
        return merging.merge_to_folder(
            self._resolver,
            base,
            adapters,
            weights,
            out=out,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=progress,
        )

    def iter_merged(
        self,
        base: StrPath,
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        device: str = "auto",
        dtype: str | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the merged model's ``(name, tensor)`` pairs one by one, writing nothing:
        for loaders that take a state dict piece by piece."""
        resolver = self._resolver
        return merging.iter_stored(resolver, base, adapters, weights, device=device, dtype=dtype)

    def merge_inputs(
        self, base: StrPath, adapters: str | Sequence[str], weights: Sequence[float] | None = None
    ) -> tuple[BaseModel, list[AdapterInfo], list[float], BaseRef]:
        """What a merge of ``adapters`` into ``base`` would read, checked, without merging:
        the opened base, each adapter's variant for it, the weights and the base's identity
        (``lorahub serve`` plans a merged checkpoint's files from them before any merge)."""
        return merging.merge_inputs(self._resolver, base, adapters, weights)

    def merged(
        self,
        base: StrPath,
        adapters: str | Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        device: str = "auto",
        dtype: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """The merged checkpoint for these inputs, made once and then served from
        ``<home>/merged/`` (least recently used entries go past ``merged_max_bytes``)."""
        cache = self._merged
        return cache.get(base, adapters, weights, device=device, dtype=dtype, progress=progress)

    def merged_list(self) -> list[MergedInfo]:
        """Merged checkpoints kept in the store, most recently used first."""
        return self._merged.entries()

    def merged_remove(self, keys: Sequence[str] = (), *, all: bool = False) -> list[str]:
        """Delete merged checkpoints by key (or a 8+ hex prefix), or every one with ``all``."""
        return self._merged.remove(keys, all=all)

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
        progress: Progress | None = None,
    ) -> ComposeResult:
        """Make a new adapter from several and store it, with its provenance; the same
        inputs give the same digest. Methods: :func:`lorahub.compose.compose`; base rules and
        errors: :func:`lorahub.composing.compose_and_store`. ``progress(modules_done, total)``
        follows the arithmetic.

        >>> hub.compose(["sql", "tone"], [1.0, 0.5], method="svd", rank=32, name="blend")
        """
        from .composing import ComposeOptions, compose_and_store

        options = ComposeOptions(
            method, rank, density, majority_sign, seed, device, allow_mixed_bases
        )
        return compose_and_store(self._importer, refs, weights, options, name, progress)

    def tag(self, reference: str, new: str) -> AdapterInfo:
        """Give the adapter ``reference`` names another name ``new`` (``name[:tag]``)."""
        return naming.tag(self._store, reference, new)

    def remove(self, reference: str, *, base: StrPath | None = None) -> list[str]:
        """Remove a name (or, for a digest, the adapter and all its names); with ``base``,
        only from the variant for that base. An adapter left without names leaves the
        catalog; its blob stays until ``gc``. Returns the names removed."""
        parse(reference)  # first: a path must be refused, not added by resolving it
        variant = self.resolve(reference, base=base) if base is not None else None
        return naming.remove(self._store, reference, variant, base)

    def export(
        self,
        reference: str,
        out: StrPath,
        *,
        force: bool = False,
        base: StrPath | None = None,
        progress: Progress | None = None,
        base_model_id: str | None = None,
    ) -> Path:
        """Write a directory ``PeftModel.from_pretrained`` loads (config, weights, model card),
        complete or not at all; ``base`` picks a name's variant. An empty folder is filled;
        with ``force`` an earlier lorahub output holding nothing else is replaced; anything
        else at ``out`` (a link, the current directory, other files) raises
        ``OutputConflict`` (a ``StoreError``). ``progress(bytes_copied, total)`` follows
        the weights' copy. ``base_model_id`` (default: the recorded base's Hub repo id) is
        the config's ``base_model_name_or_path``: see :func:`lorahub.export.export_folder`.
        Returns the folder's absolute path; :meth:`export_result` says what was written."""
        return self.export_result(
            reference, out, force=force, base=base, progress=progress, base_model_id=base_model_id
        ).path

    def export_result(
        self,
        reference: str,
        out: StrPath,
        *,
        force: bool = False,
        base: StrPath | None = None,
        progress: Progress | None = None,
        base_model_id: str | None = None,
    ) -> ExportResult:
        """:meth:`export`, returning an :class:`~lorahub.info.ExportResult`: the adapter,
        the folder and the ``base_model_name_or_path`` written (``lorahub export --json``)."""
        from .export import export_folder, recorded_base_repo

        info = self.get(reference, base=base)
        return export_folder(
            self.blobs,
            info,
            out,
            store_home=self.home,
            force=force,
            base=base,
            progress=progress,
            base_model_id=base_model_id,
            recorded_base=recorded_base_repo(self._store, info),
        )

    def base_repo_id(self, info: AdapterInfo) -> str | None:
        """The Hub repo id of the base ``info`` was made for, when that base is recorded
        with one (``lorahub base add org/name``); None for a local or unrecorded base."""
        from .export import recorded_base_repo

        return recorded_base_repo(self._store, info)

    def path(self, reference: str, *, base: StrPath | None = None) -> Path:
        """A folder ``PeftModel.from_pretrained`` loads, without a copy of the weights:
        ``<home>/paths/<digest>/`` with the config, card and ``lorahub.json`` written
        read-only and the weights a hard link to the store's blob (a symbolic link across
        filesystems). Made once; later calls return the same folder. ``base`` picks a
        name's variant. Do not write into it; ``gc`` removes it once the adapter is removed.
        Details: :mod:`lorahub.paths`.

        >>> PeftModel.from_pretrained(model, hub.path("sql-expert:v1"))  # doctest: +SKIP
        """
        from .paths import FOLDER, adapter_path

        info = self.get(reference, base=base)
        return adapter_path(self.blobs, info, self.home / FOLDER)

    def export_layout(
        self,
        out: StrPath,
        *,
        base: StrPath | None = None,
        served_model_id: str | None = None,
        references: Sequence[str] = (),
        layout: str = "vllm",
    ) -> ServingExport:
        """Keep ``out`` a folder of every adapter name that fits ``base``, as serving engines
        read it (vLLM's filesystem resolver, LoRAX): ``out/<name>/adapter_config.json`` with
        ``base_model_name_or_path = served_model_id`` and the weights linked from the store.
        Again later, it changes only what changed. Layout, names and errors:
        :func:`lorahub.serving.export_layout`.

        >>> hub.export_layout("/srv/loras", base="meta-llama/Llama-3.2-1B")  # doctest: +SKIP
        """
        from .serving import export_layout

        return export_layout(
            self._resolver,
            out,
            base=base,
            served_model_id=served_model_id,
            references=references,
            layout=layout,
        )

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
        """Delete blobs no adapter uses, stale temp files and merge leftovers older than
        ``grace`` seconds; ``dry_run`` only reports. Rules and refusals (``StoreError``):
        :func:`lorahub.upkeep.collect_garbage`."""
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
        """Repair the store from its own files, deleting nothing: an unreadable SQLite
        catalog is moved aside (``lorahub.db.damaged-<time>``), then :func:`lorahub.upkeep.fsck`.
        Example: ``hub.fsck().adapters_restored``."""
        aside, reindexed = self._store.set_aside_if_damaged(dry_run=dry_run)
        if dry_run and aside:
            return upkeep.FsckReport(catalog_set_aside=aside, dry_run=True)
        report = upkeep.fsck(
            self._store.reopen_unchecked(),
            self.blobs,
            self.records,
            dry_run=dry_run,
            quick=quick,
            refetch=self._importer.refetch,
            quarantine=self.home / "quarantine",
        )
        return replace(report, catalog_set_aside=aside, reindexed=reindexed)

    def push(
        self,
        reference: str,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        tag: str | None = None,
        path_in_repo: str | None = None,
        base: StrPath | None = None,
        base_model_id: str | None = None,
        endpoint: str | None = None,
    ) -> PushResult:
        """Push an adapter to a Hub repo as a folder PEFT loads; returns the commit and the
        bytes uploaded. ``base_model_id`` (default: the recorded base's Hub repo id) is the
        config's ``base_model_name_or_path``, never a local path, as in :meth:`export`;
        ``endpoint`` (default ``HF_ENDPOINT``) another Hub, such as a ``lorahub serve``.
        Options and errors: :func:`lorahub.remote.push_adapter`.

        >>> hub.push("sql-expert:v1", "myorg/sql-expert", tag="v1").commit_url  # doctest: +SKIP
        """
        from . import remote
        from .export import recorded_base_repo

        info = self.get(reference, base=base)
        return remote.push_adapter(
            self.blobs,
            info,
            repo_id,
            private=private,
            revision=revision,
            tag=tag,
            path_in_repo=path_in_repo,
            recorded_base=recorded_base_repo(self._store, info),
            base_model_id=base_model_id,
            endpoint=endpoint,
        )

    def pull(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        name: str | None = None,
    ) -> AdapterInfo:
        """Import a PEFT adapter from a Hub repo (``org/name[@revision]``), downloading its
        adapter files only. Naming and errors: :meth:`lorahub.storing.Importer.pull`.

        >>> hub.pull("myorg/sql-expert@v1", name="sql-expert").digest  # doctest: +SKIP
        """
        return self._importer.pull(repo_id, revision=revision, subfolder=subfolder, name=name)

    def add_token(
        self, name: str, *, write: bool = False, namespaces: Iterable[str] = ()
    ) -> access.NewToken:
        """Make an access token for ``lorahub serve`` (read, or ``write``; limited to
        ``namespaces`` if any); the result holds its secret, which is stored nowhere.
        Rules and errors: :func:`lorahub.tokens.create_token`."""
        return access.create_token(self._store, name, write=write, namespaces=namespaces)

    def tokens(self) -> builtins.list[access.TokenInfo]:
        """Every access token, by name, without its secret."""
        return access.list_tokens(self._store)

    def remove_token(self, name: str) -> access.TokenInfo:
        """Delete an access token; servers refuse it from their next request on."""
        return access.remove_token(self._store, name)

    def check_token(self, secret: str) -> access.TokenInfo | None:
        """The token whose secret this is, or None (:func:`lorahub.tokens.verify_token`)."""
        return access.verify_token(self._store, secret)

    def mark_token_used(self, info: access.TokenInfo) -> bool:
        """Record that a token was used (at most every few minutes: ``token ls`` shows it);
        returns whether it wrote (:func:`lorahub.tokens.mark_used`)."""
        return access.mark_used(self._store, info)

    # Last in the class: a method named ``list`` would shadow the builtin in the
    # annotations of every method after it.
    def list(self, *args: Any, **kwargs: Any) -> builtins.list[AdapterInfo]:
        """Deprecated alias of :meth:`list_adapters` (it shadowed the builtin ``list``);
        removed in the next release."""
        warnings.warn(
            "Hub.list() is deprecated; use Hub.list_adapters()", DeprecationWarning, stacklevel=2
        )
        return self.list_adapters(*args, **kwargs)


def open(home: StrPath | None = None) -> Hub:
    """Open (creating if needed) the store at ``home``."""
    return Hub(home)
