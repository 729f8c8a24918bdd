"""The read half of the Hub API: what each read route answers, over one open Hub."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from ..errors import AdapterNotFound, IncompatibleAdapter, InvalidInput
from .errors import HubError, repo_not_found
from .files import WEIGHTS, RepoFile, RepoFiles
from .kept import KeptAnswers
from .mapping import MAIN, VARIANT, Mapping, commit_id, names_base, variant_labels
from .merged import MergedRepos
from .zerocopy import BlobResponse

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..hub import Hub
    from ..info import AdapterInfo


def _stamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    # isoformat: 1.4 µs against strftime's 2.2, for a stamp each first model info renders
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


class ReadApi:
    """The routes' logic over one open :class:`~lorahub.hub.Hub`."""

    def __init__(self, hub: Hub, mapping: Mapping) -> None:
        # The pooled engine, opened now: each read then reuses a connection whose schema is
        # parsed, where a command's one-off read opens the catalog file (half a request).
        _ = hub.engine
        self.hub = hub
        self.mapping = mapping
        self.files = RepoFiles(hub)
        self.merged = MergedRepos(self)  # revisions tag+base: merged checkpoints
        self.kept = KeptAnswers(hub.engine)  # metadata answers, while the catalog stands

    # ------------------------------------------------------------------ lookups

    def repo(self, namespace: str, name: str) -> tuple[str, str, list[AdapterInfo]]:
        """``(repo_id, lorahub name, its adapters)``; RepoNotFound when none."""
        repo_id = f"{namespace}/{name}"
        try:
            candidates = self.mapping.names(repo_id)
        except InvalidInput as exc:
            raise HubError(400, str(exc)) from None
        for candidate in candidates:
            infos = self.hub.list_adapters([f"name={candidate}"])
            if infos:
                return repo_id, candidate, infos
        # Anonymous callers get 401, as the Hub answers them for a missing or private repo.
        raise repo_not_found(authenticated=False)

    def revision(self, name: str, infos: list[AdapterInfo], revision: str) -> AdapterInfo:
        """The adapter ``revision`` names: a tag, ``main`` (= ``latest``), a commit id, or
        ``tag@base``, the variant of a tag for one base (mapping.py)."""
        try:
            rev = self.mapping.revision(revision)
        except InvalidInput as exc:
            raise HubError(400, str(exc)) from None
        if rev.tag is None:
            for info in infos:
                if commit_id(info.digest) == revision:
                    return info
        elif rev.merged:
            pass  # a merged checkpoint is not an adapter: merged.py serves it
        elif rev.base is not None:
            return self.variant(name, rev.tag, rev.base, infos, revision)
        else:
            # ``infos`` holds every adapter of the name with its refs: no second lookup.
            ref = f"{name}:{rev.tag}"
            found = [i for i in infos if ref in i.refs]
            if len(found) == 1:
                return found[0]
            if found:
                raise self.ambiguous(name, rev.tag, infos, revision)
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def variants(
        self, name: str, tag: str, infos: list[AdapterInfo]
    ) -> list[tuple[str | None, AdapterInfo]]:
        """Each adapter under ``name:tag`` (one per base model) with the label of its
        revision ``tag@label``."""
        ref = f"{name}:{tag}"
        found = [i for i in infos if ref in i.refs]
        labels = variant_labels([i.base for i in found], self.registered())
        return sorted(zip(labels, found, strict=True), key=lambda li: (li[0] or "", li[1].digest))

    def registered(self) -> dict[str, str]:
        """Registered bases by content hash: their names label variants."""
        return {b.content_hash: b.name for b in self.hub.bases() if b.content_hash}

    def variant(
        self, name: str, tag: str, base: str, infos: list[AdapterInfo], revision: str
    ) -> AdapterInfo:
        """The adapter ``tag@base`` names: the variant listed or recorded under that base,
        else, for a registered base, the variant lorahub picks for it (``lorahub resolve``)."""
        registered = self.registered()
        variants = self.variants(name, tag, infos)
        by_label = [info for label, info in variants if label == base]
        matches = by_label or [
            info
            for label, info in variants
            if names_base(base, info.base, label, registered.get(info.base.content_hash or ""))
        ]
        if len(matches) == 1:
            return matches[0]
        known = [b for b in self.hub.bases() if base in (b.name, b.repo_id)]
        if len(known) == 1 and variants and not matches:
            fingerprint = known[0].content_hash or known[0].signature
            try:  # a catalog lookup by fingerprint: no file is read, nothing is recorded
                return self.hub.resolve(f"{name}:{tag}", base=fingerprint)
            except (IncompatibleAdapter, AdapterNotFound):
                pass
        listed = _listing(variants, revision.partition(VARIANT)[0])
        raise HubError(
            404,
            f"Invalid rev id: {revision}: no variant of {tag} for base {base!r}"
            + (f"; its variants: {listed}" if listed else ""),
            "RevisionNotFound",
        )

    def ambiguous(self, name: str, tag: str, infos: list[AdapterInfo], revision: str) -> HubError:
        """The answer to a tag holding one adapter per base: RevisionNotFound (the error
        ``hf_hub_download`` raises at once, with this message) naming each variant."""
        listed = _listing(self.variants(name, tag, infos), revision)
        return HubError(
            404,
            f"revision {revision!r} is ambiguous: it holds one adapter per base model; "
            f"name one: {listed}; or a merged checkpoint: {revision}+<base>",
            "RevisionNotFound",
        )

    # ------------------------------------------------------------------ routes

    def model_info(self, ns: str, name: str, revision: str, blobs: bool) -> Response:
        repo_id, lname, infos = self.repo(ns, name)
        info = self.revision(lname, infos, revision)
        base = self.files.card_base(info)
        if blobs:
            siblings = [_sibling(f) for f in self.files.files(info, repo_id).values()]
        else:  # names only: no file is made, no blob hashed
            siblings = [{"rfilename": name} for name in self.files.names()]
        stamp = _stamp(info.created_at)
        sha = commit_id(info.digest)
        body = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": ns,
            "sha": sha,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "peft",
            "tags": self.tags(base),
            "cardData": self.files.card_data(info, base),
            "siblings": siblings,
            "createdAt": stamp,
            "lastModified": stamp,
        }
        return JSONResponse(body)

    def tree(self, ns: str, name: str, revision: str, path: str) -> Response:
        repo_id, lname, infos = self.repo(ns, name)
        info = self.revision(lname, infos, revision)
        files = self.files.files(info, repo_id)
        path = path.strip("/")
        if path and path not in files:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", commit_id(info.digest))
        chosen = [files[path]] if path else list(files.values())
        return JSONResponse([f.tree_entry() for f in chosen])

    def refs(self, ns: str, name: str) -> Response:
        _, lname, infos = self.repo(ns, name)
        tags: dict[str, list[str]] = {}
        for info in infos:
            for ref in info.refs:
                ref_name, _, tag = ref.rpartition(":")
                if ref_name == lname:
                    tags.setdefault(tag, []).append(info.digest)
        for tag in [t for t, d in tags.items() if len(d) > 1]:  # one tag per variant
            for label, info in self.variants(lname, tag, infos):
                if label is not None:
                    tags[f"{tag}{VARIANT}{label}"] = [info.digest]
        branches = []
        if len(tags.get("latest", [])) == 1:
            latest = commit_id(tags["latest"][0])
            branches.append({"name": "main", "ref": "refs/heads/main", "targetCommit": latest})
        body = {
            "branches": branches,
            "converts": [],
            "tags": [
                {"name": t, "ref": f"refs/tags/{t}", "targetCommit": commit_id(d[0])}
                for t, d in sorted(tags.items())
                if len(d) == 1
            ],
            "pullRequests": [],
        }
        return JSONResponse(body)

    def resolve(self, ns: str, name: str, revision: str, path: str, head: bool = False) -> Response:
        """A file of the repo; the weights' ``HEAD`` answers from the catalog's size and the
        kept sha256, without the blob (never fetched from an object store for it)."""
        repo_id, lname, infos = self.repo(ns, name)
        try:
            info = self.revision(lname, infos, revision)
        except HubError as exc:
            if revision != MAIN or exc.code != "RevisionNotFound":
                raise
            # A Hub repo always has a main branch: a name without `latest` is a repo whose
            # main holds nothing, so a client probing main for a file (transformers looks
            # for adapter_config.json there) learns the file is missing, not the revision.
            raise HubError(
                404,
                f"{path} does not exist at main: {lname!r} has no `latest` tag; name a tag",
                "EntryNotFound",
            ) from None
        commit = commit_id(info.digest)
        if path == WEIGHTS:  # the hot path (a HEAD per hf_hub_download): no card rendered
            files = {path: self.files.weights(info)}
        else:
            files = self.files.files(info, repo_id)
        if path not in files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", commit)
        f: RepoFile = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.data is not None:
            media = "application/json" if path.endswith(".json") else "text/plain; charset=utf-8"
            return Response(f.data, headers=headers, media_type=media)
        assert f.fetch is not None
        headers["X-Linked-Etag"] = f'"{f.sha256}"'
        headers["X-Linked-Size"] = str(f.size)
        # The sha256 is a strong validator: If-Range compares against it.
        headers["ETag"] = f'"{f.sha256}"'
        if head:
            headers["Content-Length"] = str(f.size)
            return Response(b"", headers=headers, media_type="application/octet-stream")
        return BlobResponse(f.fetch(), headers)

    def list_models(self, params: Any, readable: Callable[[str], bool] = bool) -> Response:
        """The repos whose namespace ``readable`` accepts (the caller may see)."""
        search = (params.get("search") or "").lower()
        author = params.get("author")
        wanted = params.getlist("filter")
        try:
            limit = int(params["limit"]) if params.get("limit") else None
        except ValueError:
            limit = 0
        if limit is not None and limit < 1:
            raise HubError(400, f"invalid limit {params['limit']!r}: a whole number from 1")
        seen: dict[str, AdapterInfo] = {}
        for info in self.hub.list_adapters():  # newest first
            for ref in info.refs:
                lname, _, tag = ref.rpartition(":")
                repo_id = self.mapping.repo_id(lname)
                if repo_id not in seen or tag == "latest":
                    seen[repo_id] = info
        out = []
        for repo_id, info in sorted(seen.items()):
            if search and search not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            if not readable(repo_id.split("/")[0]):
                continue
            tags = self.tags(self.files.card_base(info))
            if any(w not in tags for w in wanted):
                continue
            stamp = _stamp(info.created_at)
            out.append(
                {
                    "_id": commit_id(info.digest)[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": commit_id(info.digest),
                    "private": False,
                    "downloads": 0,
                    "likes": 0,
                    "library_name": "peft",
                    "tags": tags,
                    "createdAt": stamp,
                    "lastModified": stamp,
                }
            )
            if limit is not None and len(out) >= limit:
                break
        return JSONResponse(out)

    def tags(self, card_base: str | None) -> list[str]:
        """The repo's tags; ``card_base`` is ``RepoFiles.card_base``'s."""
        tags = ["peft", "safetensors", "lora", "lorahub"]
        if card_base:
            tags += [f"base_model:adapter:{card_base}", f"base_model:{card_base}"]
        return tags


def _sibling(f: RepoFile) -> dict[str, Any]:
    """A file's ``siblings`` entry in a model info asked ``blobs``."""
    entry: dict[str, Any] = {"rfilename": f.name, "size": f.size, "blobId": f.etag}
    if f.is_lfs:
        pointer = f.tree_entry()["lfs"]["pointerSize"]  # type: ignore[index]
        entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": pointer}
    return entry


def _listing(variants: list[tuple[str | None, AdapterInfo]], revision: str) -> str:
    """``v1@llama (base llama), v1@wide (base wide)``."""
    return ", ".join(
        f"{revision}{VARIANT}{label} (base {info.base.name or label})"
        for label, info in variants
        if label is not None
    )
