"""Merged checkpoints over the Hub API: revision ``v1+llama`` of an adapter's repo is the full
checkpoint of ``name:v1`` merged into the registered base ``llama``, so
``AutoModelForCausalLM.from_pretrained(repo, revision="v1+llama")`` loads it.

Its files are what ``lorahub merged get`` writes: the base folder's own files (``config.json``,
tokenizer files...), the merged safetensors shard(s) and their index, and lorahub's
``README.md`` and ``lorahub.json``. Everything but the weights' bytes is known from the merge
plan (:func:`lorahub.merge.plan_merge`: every shard's exact header and size) and the base
folder, so model info, tree listings and ``HEAD`` requests answer at once without merging.
The merge runs on the first ``GET`` of a weights file, on the GPU when there is one, once per
checkpoint (one future per checkpoint in this process; across ``--workers`` processes the
merged cache's own lock), into the store's merged cache
(:class:`lorahub.merged_cache.MergedCache`), from which every download is then served with
``sendfile``, ``Range`` included. Merges run in a thread of their own, never a request thread:
a download waiting for one awaits its future, so a slow merge leaves the server answering
every other request. Each download marks its checkpoint used (its catalog row, at most once a
minute), so the checkpoint served most is not the first evicted; one evicted between the
lookup and the send is merged again, never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.responses import FileResponse, JSONResponse, Response

from ..errors import (
    AdapterNotFound,
    IncompatibleAdapter,
    InvalidInput,
    LorahubError,
    MergeBaseNotFound,
)
from .errors import HubError
from .files import git_blob_sha1, lfs_pointer
from .mapping import COMMIT, MERGED, Revision, merged_commit_id
from .zerocopy import BlobResponse

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Message, Receive, Scope, Send

    from ..info import AdapterInfo, BaseInfo
    from ..merge import MergePlan
    from .read import ReadApi

log = logging.getLogger(__name__)

_KEPT = 64  # merged repos whose file list stays in memory
_CHUNK = 1 << 20
#: Merges run at once: each holds a base and its merged copy in memory (or on the GPU).
MERGERS = 1
#: A checkpoint served from memory marks its catalog row used at most this often.
TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class MergedRevision:
    """A merged revision, resolved: the adapter, the base, and the commit the client sees."""

    repo_id: str
    revision: str
    adapter: AdapterInfo
    base: BaseInfo
    commit: str

    @property
    def key(self) -> tuple[str, str]:
        assert self.base.content_hash is not None
        return self.adapter.digest, self.base.content_hash


@dataclass(frozen=True)
class MergedFile:
    """One file of a merged repo: made in memory (``data``), a base file (``source``), or a
    weights shard (``lfs`` set), which exists only once the merge has run."""

    name: str
    size: int
    data: bytes | None = None
    source: Path | None = None
    lfs: str | None = None

    @property
    def oid(self) -> str:
        """The git oid: of the bytes, or of the LFS pointer for a shard."""
        if self.lfs is not None:
            return git_blob_sha1(lfs_pointer(self.lfs, self.size))
        if self.data is not None:
            return git_blob_sha1(self.data)
        assert self.source is not None
        return _file_oid(self.source)

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size}
        entry["path"] = self.name
        if self.lfs is not None:
            pointer = len(lfs_pointer(self.lfs, self.size))
            entry["lfs"] = {"oid": self.lfs, "size": self.size, "pointerSize": pointer}
        return entry


@dataclass(frozen=True)
class Layout:
    """A merged repo's files by name and its model card's metadata."""

    files: dict[str, MergedFile]
    card: dict[str, Any]


def shard_id(adapter_digest: str, base_content_hash: str, shard: str) -> str:
    """The stable id of a merged weights shard, its ETag and LFS oid.

    Not the shard's sha256: that is known only once the merge has run, and metadata requests
    must answer before it (an ETag that changed after the merge would also split a client's
    cache). The client only names its cached blob by the ETag and checks the size after a
    download (HUB-PROTOCOL.md 2.10); the inputs of a merge decide its bytes, so a function of
    them (what the merged cache's key is made of, and the file name) is as stable an id.
    """
    text = f"lorahub-merged-file:{adapter_digest}+{base_content_hash}:base-dtype:{shard}"
    return hashlib.sha256(text.encode()).hexdigest()


class MergedRepos:
    """The merged revisions of the repos ``api`` serves (thread safe)."""

    def __init__(self, api: ReadApi) -> None:
        self.api = api
        self.hub = api.hub
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, ...], threading.Lock] = {}
        self._layouts: OrderedDict[tuple[str, str], Layout] = OrderedDict()
        self._paths: dict[tuple[str, str], Path] = {}
        self._merges: dict[tuple[str, str], Future[Path]] = {}
        self._touched: dict[tuple[str, str], float] = {}
        self._mergers = ThreadPoolExecutor(MERGERS, thread_name_prefix="lorahub-merge")
        threading.Thread(target=self._warm, name="lorahub-merged-warm", daemon=True).start()

    def _warm(self) -> None:
        """Import torch and the merge code now where merged revisions can be served (a base
        with local weights is registered): the first request would otherwise wait seconds
        for the import, past ``hf_hub_download``'s 10 s HEAD timeout on a busy machine."""
        try:
            # The base records on disk say cheaply whether any base is registered: a store
            # of adapters only imports nothing here.
            if any(self.hub.records.bases_dir.glob("*.json")) and self._local_bases():
                import torch  # noqa: F401

                from .. import merge, merging  # noqa: F401
                from ..formats import peft  # noqa: F401
        except Exception:  # a store that cannot be read answers its requests with the error
            log.debug("warming up for merged revisions failed", exc_info=True)

    # ------------------------------------------------------------------ lookups

    def answer(
        self,
        ns: str,
        name: str,
        revision: str,
        adapter: Callable[[], Response],
        merged: Callable[[MergedRevision], Response],
    ) -> Response:
        """``merged(...)`` of the merged revision ``revision`` names, else ``adapter()`` (the
        read API's answer). A commit id is first tried as an adapter's, so the adapters'
        answers cost no more than before; only one no adapter has is looked for here."""
        if MERGED in revision:
            return merged(self.find(ns, name, revision))
        if not COMMIT.match(revision):
            return adapter()
        try:
            return adapter()
        except HubError as exc:
            if exc.code != "RevisionNotFound":
                raise
            repo_id, _, infos = self.api.repo(ns, name)
            found = self._by_commit(repo_id, infos, revision)
            if found is None:
                raise
        return merged(found)

    def find(self, ns: str, name: str, revision: str) -> MergedRevision:
        """The merged revision ``tag+base`` names.

        Raises:
            HubError: 400 for a malformed revision; 404 RevisionNotFound for no such tag or
                registered base, a base without local weights, or an adapter that does not
                fit it.
        """
        repo_id, lname, _ = self.api.repo(ns, name)
        try:
            rev = self.api.mapping.revision(revision)
        except ValueError as exc:
            raise HubError(400, str(exc)) from None
        assert rev.tag is not None and rev.base is not None
        base = self._base(rev.base, revision)
        adapter = self._adapter(lname, rev, base)
        assert base.content_hash is not None
        commit = merged_commit_id(adapter.digest, base.content_hash)
        return MergedRevision(repo_id, revision, adapter, base, commit)

    def _by_commit(
        self, repo_id: str, infos: list[AdapterInfo], revision: str
    ) -> MergedRevision | None:
        for base in self._local_bases():
            assert base.content_hash is not None
            for info in infos:
                if merged_commit_id(info.digest, base.content_hash) == revision:
                    return MergedRevision(repo_id, revision, info, base, revision)
        return None

    def _local_bases(self) -> list[BaseInfo]:
        """Registered bases a merge can read: recorded with a content hash and a path."""
        return [b for b in self.hub.bases() if b.content_hash and b.path]

    def _base(self, text: str, revision: str) -> BaseInfo:
        """The registered base ``text`` names: its name, repo id, or 12+ hex of its content
        hash or signature."""
        from ..digest import PREFIX, hex_prefix
        from ..refs import MIN_PREFIX

        bases = self.hub.bases()
        found = [b for b in bases if text in (b.name, b.repo_id)]
        hexpart = hex_prefix(text, MIN_PREFIX)
        if not found and hexpart is not None:
            found = [
                b
                for b in bases
                if any(
                    (h or "").removeprefix(PREFIX).startswith(hexpart)
                    for h in (b.content_hash, b.signature)
                )
            ]
        if not found:
            names = ", ".join(sorted(b.name for b in bases)) or "none"
            raise _no_rev(
                revision,
                f"no registered base model {text!r} on this server (registered: {names}; "
                "`lorahub base add` registers one)",
            )
        if len({b.content_hash or b.signature for b in found}) > 1:
            listed = ", ".join(f"{b.name} ({b.content_hash or b.signature})" for b in found)
            raise _no_rev(revision, f"{text!r} names several bases: {listed}; give 12+ hex")
        base = found[-1]
        if not base.content_hash or not base.path or not Path(base.path).exists():
            raise _no_rev(
                revision,
                f"the base {base.name!r} has no local weights on this server; a merge needs "
                "them (register its folder with `lorahub base add`)",
            )
        return base

    def _adapter(self, lname: str, rev: Revision, base: BaseInfo) -> AdapterInfo:
        """The variant of ``lname:tag`` lorahub picks for ``base`` (``lorahub resolve``)."""
        ref = f"{lname}:{rev.tag}"
        try:  # by fingerprint: a catalog lookup, no file read, nothing recorded
            return self.hub.resolve(ref, base=base.content_hash or base.signature)
        except AdapterNotFound:
            raise _no_rev(rev.text, f"no adapter {ref}") from None
        except IncompatibleAdapter as exc:
            raise _no_rev(rev.text, str(exc)) from None

    # ------------------------------------------------------------------ routes

    def model_info(self, m: MergedRevision, blobs: bool) -> Response:
        from .read import _stamp

        layout = self.layout(m)
        siblings = []
        for f in layout.files.values():
            entry: dict[str, Any] = {"rfilename": f.name}
            if blobs:
                tree = f.tree_entry()
                entry |= {"size": f.size, "blobId": tree["oid"]}
                if "lfs" in tree:
                    lfs = tree["lfs"]
                    entry["lfs"] = {"size": f.size, "sha256": f.lfs, **lfs}
                    entry["lfs"].pop("oid")
            siblings.append(entry)
        ns = m.repo_id.split("/")[0]
        stamp = _stamp(m.adapter.created_at)
        tags = ["transformers", "safetensors", "merge", "lorahub"]
        base_model = layout.card.get("base_model")
        if isinstance(base_model, str):
            tags += [f"base_model:merge:{base_model}", f"base_model:{base_model}"]
        body = {
            "_id": m.commit[:24],
            "id": m.repo_id,
            "modelId": m.repo_id,
            "author": ns,
            "sha": m.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "tags": tags,
            "cardData": layout.card,
            "siblings": siblings,
            "createdAt": stamp,
            "lastModified": stamp,
        }
        return JSONResponse(body)

    def tree(self, m: MergedRevision, path: str) -> Response:
        files = self.layout(m).files
        path = path.strip("/")
        if path and path not in files:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", m.commit)
        chosen = [files[path]] if path else list(files.values())
        return JSONResponse([f.tree_entry() for f in chosen])

    def resolve(self, m: MergedRevision, path: str, head: bool) -> Response:
        """A file; a weights shard's ``HEAD`` answers from the plan, its ``GET`` merges first
        (once, awaited by the response: no request thread waits) and is then served from the
        merged cache."""
        files = self.layout(m).files
        if path not in files:
            raise HubError(404, f"{path} does not exist at {m.revision}", "EntryNotFound", m.commit)
        f = files[path]
        headers = {"X-Repo-Commit": m.commit, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.data is not None:
            media = "application/json" if path.endswith(".json") else "text/plain; charset=utf-8"
            return Response(f.data, headers=headers, media_type=media)
        if f.source is not None:
            return FileResponse(f.source, headers=headers, media_type="application/octet-stream")
        assert f.lfs is not None
        headers |= {"ETag": f'"{f.lfs}"', "X-Linked-Etag": f'"{f.lfs}"'}
        headers["X-Linked-Size"] = str(f.size)
        if head:
            headers["Content-Length"] = str(f.size)
            return Response(b"", headers=headers, media_type="application/octet-stream")
        with self._lock:
            known = self._paths.get(m.key)
        if known is not None:
            self._touch(m, known)
        return _ShardResponse(self, m, f, headers)

    # ------------------------------------------------------------------ the merge

    def layout(self, m: MergedRevision) -> Layout:
        """The merged repo's files, from the merge plan: no merge runs. Made once per
        adapter and base (opening the base reads its headers and records it)."""
        with self._lock:
            if m.key in self._layouts:
                self._layouts.move_to_end(m.key)
                return self._layouts[m.key]
        with self._key_lock(("layout", *m.key)):
            with self._lock:
                if m.key in self._layouts:
                    return self._layouts[m.key]
            layout = self._plan(m)
            with self._lock:
                self._layouts[m.key] = layout
                while len(self._layouts) > _KEPT:
                    self._layouts.popitem(last=False)
        return layout

    def checkpoint(self, m: MergedRevision) -> Path:
        """The merged checkpoint's folder in the merged cache, merged on the first call
        (blocks: requests await :meth:`merging` instead)."""
        return self.merging(m).result()

    def merging(self, m: MergedRevision) -> Future[Path]:
        """The merged checkpoint's folder, as a future: done already when it is known and
        still there, else the one merge of it in flight, else a new one (in the merge
        thread; a failed merge is tried again by the next request)."""
        with self._lock:
            path = self._paths.get(m.key)
        if path is not None and path.is_dir():
            done: Future[Path] = Future()
            done.set_result(path)
            return done
        with self._lock:
            future = self._merges.get(m.key)
            if future is None:
                future = self._mergers.submit(self._merge, m)
                self._merges[m.key] = future
        return future

    def _merge(self, m: MergedRevision) -> Path:
        try:
            log.info(
                "merging %s into %s for %s (first download of its weights)",
                m.adapter.short,
                m.base.name,
                m.repo_id,
            )
            assert m.base.path is not None
            # Already in the merged cache (made by another process, or before a restart):
            # found there, and its row marked used.
            path = self.hub.merged(m.base.path, "@" + m.adapter.digest)
            with self._lock:
                self._paths[m.key] = path
            return path
        finally:
            with self._lock:
                self._merges.pop(m.key, None)

    def forget(self, m: MergedRevision, path: Path) -> None:
        """``path`` no longer holds the checkpoint (evicted): the next request merges it."""
        with self._lock:
            if self._paths.get(m.key) == path:
                del self._paths[m.key]

    def _touch(self, m: MergedRevision, path: Path) -> None:
        """Mark the checkpoint used in the catalog (``last_used_at``, the merged cache's
        eviction clock), at most once every ``TOUCH_EVERY_S`` per checkpoint: served from
        memory, it would otherwise look unused and be the first evicted."""
        now = time.monotonic()
        with self._lock:
            last = self._touched.get(m.key)
            if last is not None and now - last < TOUCH_EVERY_S:
                return
            self._touched[m.key] = now
        from ..catalog import db
        from ..catalog import merged as merged_q
        from ..digest import PREFIX

        try:
            with db.write_session(self.hub.engine) as s:
                row = merged_q.get(s, PREFIX + path.name)  # its folder is named by its key
                if row is not None:
                    merged_q.touch(row)
        except LorahubError as exc:  # a busy catalog must not fail a download
            log.warning("could not mark merged checkpoint %s used: %s", path.name, exc)

    def _key_lock(self, key: tuple[str, ...]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _plan(self, m: MergedRevision) -> Layout:
        from ..card import split_card
        from ..merge import plan_merge, resolve_device
        from ..merge.writer import merge_record, merged_card_text
        from ..merging import merge_metadata
        from ..outputs import MARKER, MERGE_CARD

        assert m.base.path is not None
        try:
            # What MergedCache.get does before its merge: the same inputs, so the same plan.
            model, infos, w, base_ref = self.hub.merge_inputs(m.base.path, "@" + m.adapter.digest)
        except (MergeBaseNotFound, IncompatibleAdapter) as exc:
            raise _no_rev(m.revision, str(exc)) from None
        adapters = [self.hub.load_info(i) for i in infos]
        plan = plan_merge(model, adapters, w)
        doc = merge_record(
            model, plan, adapters, resolve_device("auto"), merge_metadata(base_ref, infos, w)
        )
        card = merged_card_text(model, plan, doc).encode()
        files: dict[str, MergedFile] = {}
        for shard in plan.shards:
            lfs = shard_id(m.adapter.digest, m.key[1], shard.name)
            files[shard.name] = MergedFile(shard.name, shard.file_bytes, lfs=lfs)
        if len(plan.shards) > 1:
            index = index_bytes(plan)
            files[plan.index_name] = MergedFile(plan.index_name, len(index), data=index)
        assert model.root is not None
        for name in plan.aux_files:
            source = model.root / name
            files[name] = MergedFile(name, source.stat().st_size, source=source)
        marker = json.dumps(doc, indent=2).encode()
        files[MERGE_CARD] = MergedFile(MERGE_CARD, len(card), data=card)
        files[MARKER] = MergedFile(MARKER, len(marker), data=marker)
        metadata, _ = split_card(card.decode())
        return Layout(dict(sorted(files.items())), metadata)


class _ShardResponse(Response):
    """A merged weights shard: the merge's future awaited (no request thread is held while
    it runs), then the shard sent by :class:`BlobResponse`. A checkpoint evicted after the
    lookup (its file gone before it was opened) is merged again once; errors are answered
    as the app answers them."""

    def __init__(
        self, repos: MergedRepos, m: MergedRevision, f: MergedFile, headers: dict[str, str]
    ) -> None:
        super().__init__(headers=headers, media_type="application/octet-stream")
        self.repos, self.m, self.file, self.given = repos, m, f, headers
        self.started = False  # a message was sent: too late for another answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tracked(message: Message) -> None:
            self.started = True
            await send(message)

        try:
            await self._send(scope, receive, tracked)
        except (HubError, LorahubError) as exc:
            if self.started:
                raise
            if not isinstance(exc, HubError):
                log.warning("serving %s: %s", self.file.name, exc)
                exc = HubError(400 if isinstance(exc, InvalidInput) else 500, str(exc))
            await exc.response()(scope, receive, send)

    async def _send(self, scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(2):
            # Shielded: a client gone away cancels its wait, never the merge others await.
            folder = await asyncio.shield(asyncio.wrap_future(self.repos.merging(self.m)))
            shard = folder / self.file.name
            try:
                size = shard.stat().st_size
            except FileNotFoundError:
                self.repos.forget(self.m, folder)  # evicted since: merge it again
                continue
            if size != self.file.size:  # the plan and the writer disagree: a bug
                raise HubError(
                    500, f"{self.file.name} of the merged checkpoint is not the planned size"
                )
            try:  # BlobResponse opens the file before it sends anything
                await BlobResponse(shard, self.given)(scope, receive, send)
                return
            except (FileNotFoundError, RuntimeError):  # RuntimeError: FileResponse's "missing"
                if self.started or shard.exists():
                    raise
                self.repos.forget(self.m, folder)
        raise HubError(
            503,
            f"the merged checkpoint of {self.m.revision} was evicted while being sent; try again",
        )


def index_bytes(plan: MergePlan) -> bytes:
    """The shard index a merge writes beside several shards (as lorahub.merge.writer does)."""
    index = {
        "metadata": {"total_size": plan.data_bytes},
        "weight_map": {tp.name: plan.shards[tp.shard].name for tp in plan.tensors},
    }
    return json.dumps(index, indent=2).encode()


_OIDS: dict[tuple[str, int, int], str] = {}


def _file_oid(path: Path) -> str:
    """The git oid of a base file, hashed once per (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _OIDS:
        h = hashlib.sha1(b"blob %d\0" % st.st_size)
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _OIDS[key] = h.hexdigest()
    return _OIDS[key]


def _no_rev(revision: str, why: str) -> HubError:
    """RevisionNotFound: the error hf_hub_download raises at once, with this message."""
    return HubError(404, f"Invalid rev id: {revision}: {why}", "RevisionNotFound")
