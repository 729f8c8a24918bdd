"""``Hub``: the public Python API, tying the blob store, the catalog and the formats together.

>>> import lorahub
>>> hub = lorahub.open(home="/tmp/lorahub-demo")
>>> info = hub.add("./my-peft-adapter", name="sql-expert:v1").adapter
>>> hub.export("sql-expert:v1", "./out")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import manifest as mf
from .adapter import LoraAdapter
from .blobs import BlobStore
from .catalog import bases as bases_q
from .catalog import db
from .catalog import merged as merged_q
from .catalog import queries as q
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
    VerifyProblem,
    VerifyReport,
)
from .manifest import BaseRef
from .refs import Reference, format_ref, local_path, parse, validate_name
from .settings import Settings, load

if TYPE_CHECKING:
    import torch
    from sqlalchemy import Engine

    from .base import BaseModel, TensorInfo
    from .compat import CompatReport
    from .merge import MergeResult
    from .remote import PushResult

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
        try:
            for sub in ("blobs", "tmp", "merged"):
                (self.home / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.home}: {exc}") from exc
        self.blobs = BlobStore(self.home / "blobs", self.home / "tmp")
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        return f"Hub(home={str(self.home)!r})"

    @property
    def engine(self) -> Engine:
        """The catalog engine, migrated on first use."""
        if self._engine is None:
            engine = db.make_engine(self.settings.db_url)
            db.upgrade(engine, self.home / "migrate.lock")
            self._engine = engine
        return self._engine

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

        Returns an ``AddResult`` whose status is ``added`` or ``present``.

        Raises:
            InvalidAdapter: the source is not a readable adapter; the store is unchanged.
        """
        path = Path(source)
        adapter, fmt, unmapped = self._read(path, base)
        origin: dict[str, Any] = {"path": str(path.resolve()), "format": fmt}
        if unmapped:
            origin["unmapped_keys"] = unmapped
        info, added = self.store(
            adapter, name=name, origin_kind="import", origin=origin, base=base, force=force
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
            if not dirs and recursive:
                dirs = (
                    [p for p in sorted(root.rglob("*.safetensors")) if p.is_file()] if base else []
                )
            if not dirs:
                hint = "" if recursive else " (use --recursive to search below it)"
                results.append(
                    AddResult(str(root), "refused", reason=f"no adapter found in {root}{hint}")
                )
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
            except LorahubError as exc:
                results.append(AddResult(str(path), "refused", reason=str(exc)))
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

        def write(path: Path) -> None:
            peft.write_canonical(adapter, path)

        weights, size = self.blobs.put_file(write)
        manifest = mf.build(adapter, weights, size, base_ref, provenance)
        if adapter.metadata:  # kohya's ss_* keys and the like: kept, but not identity
            origin = {**origin, "metadata": dict(adapter.metadata)}
        text = mf.encode(manifest).decode()
        digest = str(hash_bytes(text.encode()))

        def commit() -> tuple[AdapterInfo, bool]:
            with db.write_session(self.engine) as s:
                row = q.adapter_by_digest(s, digest)  # the write lock is held from here
                if not self.blobs.path(weights).is_file():
                    # A gc that listed the blob before put_file refreshed it deleted it since;
                    # gc needs the write lock too, so once written again it stays.
                    self.blobs.put_file(write)
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
                if ref is not None:
                    q.set_ref(s, ref.name, ref.tag, row)  # type: ignore[arg-type]
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
        with db.read_session(self.engine) as s:
            return q.to_info(self._find(s, reference))

    def list(
        self,
        filters: Iterable[str] | Mapping[str, str] = (),
        *,
        base: str | os.PathLike[str] | None = None,
        limit: int | None = None,
    ) -> list[AdapterInfo]:
        """Stored adapters, newest first; ``filters`` like ``["rank=16", "target=q_proj"]``;
        ``base`` keeps only those that fit that base model."""
        parsed = q.parse_filters(filters)
        with db.read_session(self.engine) as s:
            infos = [q.to_info(r) for r in q.list_adapters(s, parsed, None if base else limit)]
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
            bases_q.delete(s, rows[0])
            return info

    def _base_context(
        self, base: str | os.PathLike[str], model: BaseModel | None = None
    ) -> _BaseContext:
        """A base's tensor table and identity: from the catalog when it is recorded under
        that name (no file access), else read from disk or the Hub and recorded."""
        text = os.fspath(base)
        if not Path(text).expanduser().exists():
            with db.read_session(self.engine) as s:
                rows = bases_q.find(s, text)
                if len(rows) > 1:
                    hashes = {r.content_hash or r.signature for r in rows}
                    if len(hashes) > 1:
                        raise AmbiguousReference(
                            text,
                            [f"{r.name} {r.content_hash or r.signature}" for r in rows],
                            hint="give the base's path or its content hash",
                        )
                if rows:
                    row = rows[-1]
                    return _BaseContext(
                        bases_q.tensor_table(row), _base_ref(bases_q.to_info(row)), row.id
                    )
        info = self._record_base(model, text) if model is not None else self.add_base(text)
        with db.read_session(self.engine) as s:
            row = bases_q.by_id(s, info.id)
            assert row is not None
            return _BaseContext(bases_q.tensor_table(row), _base_ref(info), info.id)

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

    def _outside_store(self, out: str | os.PathLike[str]) -> Path:
        """``out`` as a path, refused when it is the store, lies in it or holds it: with
        ``--force`` such an output would replace what the store keeps."""
        dest = Path(out).expanduser()
        target, home = dest.resolve(), self.home.resolve()
        if target == home or target.is_relative_to(home) or home.is_relative_to(target):
            raise StoreError(
                f"{dest} overlaps the lorahub store at {home}; write the output somewhere else"
            )
        return dest

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
        with db.read_session(self.engine) as s:
            rows = q.candidates(s, ref)
            if not rows:
                raise AdapterNotFound(ref.text)
            named = ref.name is not None and any(
                x.name == ref.name and x.tag == ref.tag for r in rows for x in r.refs
            )
            if not named and len(rows) > 1:  # a prefix of several digests, not base variants
                raise AmbiguousReference(ref.text, [r.digest for r in rows])
            infos = [q.to_info(r) for r in rows]
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

        self._outside_store(out)
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
        from filelock import FileLock

        from .merge import merge_to_dir, normalize_dtype

        model, infos, w, base_ref = self._merge_inputs(base, adapters, weights)
        dt = normalize_dtype(dtype) or "base"
        parts = [[i.digest, x] for i, x in zip(infos, w, strict=True)]
        key_doc = {"base": base_ref.content_hash, "adapters": parts, "dtype": dt}
        key = str(hash_bytes(canonical_json(key_doc)))
        out = self.home / "merged" / key.split(":")[1]
        with FileLock(str(out) + ".lock"):
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
    ) -> ComposeResult:
        """Make a new adapter from several and store it, with its provenance.

        ``cat`` and ``linear`` are exact; ``svd`` truncates the exact blend to ``rank``;
        ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` prune the deltas
        (``density``) and then refactor. The report gives each module's relative error.
        Composing the same inputs again gives the same digest (DARE is seeded).

        Example:
            >>> hub.compose(["sql", "tone"], [1.0, 0.5], method="svd", rank=32, name="blend")
        """
        from .compose import compose

        infos = [self.get(self._stored_ref(r, None)) for r in refs]  # a path is added first
        signatures = {i.base.signature for i in infos if i.base.signature}
        if len(signatures) > 1:
            listed = [f"{i.refs[0] if i.refs else i.short}: base {i.base.name}" for i in infos]
            raise ComposeError(
                "the adapters were recorded for different base architectures: " + "; ".join(listed)
            )
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
        variants = {i.base for i in infos}
        base = (
            variants.pop()
            if len(variants) == 1
            else BaseRef(signature=next(iter(signatures), None))
        )
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
        with db.write_session(self.engine) as s:
            row = self._find(s, reference)
            q.set_ref(s, target.name, target.tag, row)
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
        with db.write_session(self.engine) as s:
            row = self._find(s, ref if digest is None else parse("@" + digest))
            by_name = ref.name is not None and any(
                r.name == ref.name and r.tag == ref.tag for r in row.refs
            )
            if by_name:
                q.remove_ref(s, ref.name, ref.tag, row.id)  # type: ignore[arg-type]
                removed.append(format_ref(ref.name, ref.tag))  # type: ignore[arg-type]
                s.expire(row)
                if q.ref_count(s, row.id) == 0:
                    q.delete_adapter(s, row)
            else:
                removed.extend(format_ref(r.name, r.tag) for r in row.refs)
                q.delete_adapter(s, row)
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

        The directory appears complete or not at all. ``base`` picks a name's variant.
        """
        info = self.get(reference, base=base)
        dest = self._outside_store(out)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
            raise StoreError(f"{dest} already exists and is not empty; pass --force to replace it")
        from .card import adapter_card

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
            (tmp / "lorahub.json").write_text(mf.lorahub_json_text(info.digest, info.manifest))
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            publish_dir(tmp, dest, replace=True)
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ------------------------------------------------------------------ health

    def verify(self, *, quick: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Re-hash every blob (or, ``quick``, check existence and size) and check every
        adapter row against its blob and its manifest."""
        from .catalog.models import Adapter, Blob

        problems: list[VerifyProblem] = []
        with db.read_session(self.engine) as s:
            blobs = [(b.digest, b.size) for b in s.query(Blob)]
            adapters = [(a.digest, a.weights_digest, a.size, a.manifest) for a in s.query(Adapter)]
        total = sum(size for _, size in blobs)
        done = 0
        for digest, size in blobs:
            problem = self.blobs.verify(Digest.parse(digest), size, quick)
            if problem:
                problems.append(VerifyProblem("blob", digest, problem))
            done += size
            if progress:
                progress(done, total)
        known = {d for d, _ in blobs}
        for digest, weights, _size, text in adapters:
            if weights not in known:
                problems.append(
                    VerifyProblem("adapter", digest, f"weights blob {weights} has no row")
                )
            if str(hash_bytes(text.encode())) != digest:
                problems.append(
                    VerifyProblem("adapter", digest, "manifest does not hash to its digest")
                )
            try:
                if json.loads(text)["weights"]["digest"] != weights:
                    problems.append(VerifyProblem("adapter", digest, "manifest names another blob"))
            except (KeyError, ValueError):
                problems.append(VerifyProblem("adapter", digest, "manifest is not valid"))
        return VerifyReport(len(blobs), len(adapters), tuple(problems))

    def gc(self, *, grace: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcReport:
        """Delete blobs no adapter uses and stale temp files, older than ``grace`` seconds.

        The grace period protects a concurrent ``add`` that has published a blob and not
        yet committed the row that uses it.
        """
        from .catalog.models import Blob

        cutoff = time.time() - grace
        freed: list[str] = []
        size = 0
        session = db.read_session if dry_run else db.write_session
        with session(self.engine) as s:
            used = q.referenced_weights(s)
            rows = {b.digest: b for b in s.query(Blob)}
            for info in self.blobs:
                key = str(info.digest)
                if key in used or info.mtime >= cutoff:
                    continue
                freed.append(key)
                size += info.size
                if not dry_run:
                    if key in rows:
                        s.delete(rows[key])
                    self.blobs.delete(info.digest)
            if not dry_run:
                on_disk = {str(b.digest) for b in self.blobs}
                for key, row in rows.items():
                    if key not in used and key not in on_disk:
                        s.delete(row)
        temps = self.blobs.stale_temp_files(grace)
        for t in temps:
            try:
                size += t.stat().st_size
                if not dry_run:
                    t.unlink()
            except FileNotFoundError:
                pass
        return GcReport(tuple(freed), tuple(str(t) for t in temps), size, dry_run)

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
