"""The read half of the Hub API: what each read route answers, over one open Hub."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.responses import FileResponse, JSONResponse, Response

from ..errors import AdapterNotFound, AmbiguousReference, InvalidInput
from .errors import HubError, repo_not_found
from .files import RepoFile, RepoFiles
from .mapping import Mapping, commit_id

if TYPE_CHECKING:
    from ..hub import Hub
    from ..info import AdapterInfo


def _stamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ReadApi:
    """The routes' logic over one open :class:`~lorahub.hub.Hub`."""

    def __init__(self, hub: Hub, mapping: Mapping) -> None:
        self.hub = hub
        self.mapping = mapping
        self.files = RepoFiles(hub)

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
        """The adapter ``revision`` names: a tag, ``main`` (= ``latest``) or a commit id."""
        try:
            tag = self.mapping.tag(revision)
        except InvalidInput as exc:
            raise HubError(400, str(exc)) from None
        if tag is None:
            for info in infos:
                if commit_id(info.digest) == revision:
                    return info
        else:
            try:
                return self.hub.get(f"{name}:{tag}")
            except AmbiguousReference as exc:
                raise HubError(400, f"revision {revision!r} is ambiguous: {exc}") from None
            except AdapterNotFound:
                pass
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ routes

    def model_info(self, ns: str, name: str, revision: str, blobs: bool) -> Response:
        repo_id, lname, infos = self.repo(ns, name)
        info = self.revision(lname, infos, revision)
        files = self.files.files(info, repo_id)
        from ..card import split_card

        card, _ = split_card(files["README.md"].data.decode() if files["README.md"].data else "")
        siblings = []
        for f in files.values():
            entry: dict[str, Any] = {"rfilename": f.name}
            if blobs:
                entry["size"] = f.size
                entry["blobId"] = f.etag
                if f.is_lfs:
                    pointer = f.tree_entry()["lfs"]["pointerSize"]  # type: ignore[index]
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": pointer}
            siblings.append(entry)
        stamp = _stamp(info.created_at)
        body = {
            "_id": commit_id(info.digest)[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": ns,
            "sha": commit_id(info.digest),
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "peft",
            "tags": self.tags(info),
            "cardData": card,
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

    def resolve(self, ns: str, name: str, revision: str, path: str) -> Response:
        repo_id, lname, infos = self.repo(ns, name)
        info = self.revision(lname, infos, revision)
        commit = commit_id(info.digest)
        files = self.files.files(info, repo_id)
        if path not in files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", commit)
        f: RepoFile = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.data is not None:
            media = "application/json" if path.endswith(".json") else "text/plain; charset=utf-8"
            return Response(f.data, headers=headers, media_type=media)
        assert f.path is not None
        headers["X-Linked-Etag"] = f'"{f.sha256}"'
        headers["X-Linked-Size"] = str(f.size)
        # The sha256 is a strong validator: If-Range compares against it.
        headers["ETag"] = f'"{f.sha256}"'
        return FileResponse(f.path, headers=headers, media_type="application/octet-stream")

    def list_models(self, params: Any) -> Response:
        search = (params.get("search") or "").lower()
        author = params.get("author")
        wanted = params.getlist("filter")
        try:
            limit = int(params["limit"]) if params.get("limit") else None
        except ValueError:
            raise HubError(400, f"invalid limit {params['limit']!r}") from None
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
            tags = self.tags(info)
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

    def tags(self, info: AdapterInfo) -> list[str]:
        from ..formats.peft_folder import published_base

        _, card_base = published_base(info, recorded_base=self.hub.base_repo_id(info))
        tags = ["peft", "safetensors", "lora", "lorahub"]
        if card_base:
            tags += [f"base_model:adapter:{card_base}", f"base_model:{card_base}"]
        return tags
