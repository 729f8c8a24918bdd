"""The read half of the Hub HTTP API over a store, as a Starlette app (``lorahub serve``).

What ``huggingface_hub`` asks and what it checks are in ``HUB-PROTOCOL.md``; the routes:

* ``GET /api/models/{ns}/{name}[/revision/{rev}]``: model info (``sha``, ``siblings``,
  ``cardData``, ``tags``); ``?blobs=True`` adds sizes and LFS facts.
* ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]``, ``GET .../refs``.
* ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{file}``: the file, answered directly (no
  redirect); the weights are the store's blob, sent with ``sendfile``, ``Range`` honoured,
  with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
* ``GET /api/models`` (``search``, ``author``, ``filter``), ``GET /api/whoami-v2`` (401: no
  tokens yet, every caller is anonymous).

The raw path is split on ``/`` before each segment is percent-decoded, as the client quotes a
revision into one segment. Errors carry ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``), which is what the client maps to its exception
classes; bad input (a ``..``, a slash or a NUL where a name goes) is a 400. No Xet header is
ever sent. Handlers run in Starlette's thread pool; the store allows concurrent readers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import AdapterNotFound, AmbiguousReference, InvalidInput, LorahubError
from .files import RepoFile, RepoFiles
from .mapping import Mapping, commit_id

if TYPE_CHECKING:
    from ..hub import Hub
    from ..info import AdapterInfo

log = logging.getLogger(__name__)

#: Where ``lorahub serve --workers N`` passes the namespace to each worker process.
NAMESPACE_ENV = "LORAHUB_SERVE_NAMESPACE"


class HubError(Exception):
    """An answer the client turns into one of its errors."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit

    def response(self) -> Response:
        # Header values are latin-1 and one line: the full text goes in the JSON body.
        line = " ".join(self.message.split()).encode("ascii", "replace").decode()
        headers = {"X-Error-Message": line}
        if self.code:
            headers["X-Error-Code"] = self.code
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return JSONResponse({"error": self.message}, self.status, headers=headers)


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
        raise HubError(401, "Repository not found", "RepoNotFound")

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


# ---------------------------------------------------------------------- dispatch


def _segments(request: Request) -> list[str]:
    """The path's segments, each percent-decoded after the split; ``..``, ``.``, NUL and
    backslashes are refused."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    text = raw.split(b"?", 1)[0].decode("latin-1")
    parts = [unquote(p) for p in text.split("/")[1:]]
    for p in parts:
        if p in (".", "..") or "\0" in p or "\\" in p or p.startswith("/") or "/../" in f"/{p}/":
            raise HubError(400, f"invalid path segment {p!r}")
    return parts


def _route(api: ReadApi, request: Request) -> Response:
    s = _segments(request)
    method = request.method
    if method not in ("GET", "HEAD"):
        raise HubError(405, f"{method} is not served yet: this server is read only")
    if s[:1] == ["api"]:
        if s == ["api", "whoami-v2"]:
            raise HubError(401, "Invalid username or password.")
        if s == ["api", "agent-harnesses"]:
            return JSONResponse({"standardEnvVars": [], "harnesses": {}})
        if s == ["api", "models"] or s == ["api", "models", ""]:
            return api.list_models(request.query_params)
        if len(s) >= 4 and s[1] == "models":
            ns, name, rest = s[2], s[3], s[4:]
            if not rest:
                return api.model_info(ns, name, "main", _true(request, "blobs"))
            if rest[0] == "revision" and len(rest) == 2:
                return api.model_info(ns, name, rest[1], _true(request, "blobs"))
            if rest[0] == "tree" and len(rest) >= 2:
                return api.tree(ns, name, rest[1], "/".join(rest[2:]))
            if rest == ["refs"]:
                return api.refs(ns, name)
            if rest[0] in ("xet-read-token", "xet-write-token"):
                raise HubError(404, "lorahub serve does not serve Xet; set HF_HUB_DISABLE_XET=1")
        raise HubError(404, f"no such API route: /{'/'.join(s)}")
    if len(s) >= 5 and s[2] == "resolve":
        path = "/".join(s[4:])
        return api.resolve(s[0], s[1], s[3], path)
    raise HubError(404, "not found")


def _true(request: Request, key: str) -> bool:
    return request.query_params.get(key, "").lower() in ("1", "true")


def create_app(hub: Hub, namespace: str = "local") -> Starlette:
    """The Starlette app serving ``hub``'s store read only; names without a namespace
    appear under ``namespace``.

    Example:
        >>> uvicorn.run(create_app(lorahub.open()), port=8000)  # doctest: +SKIP
    """
    api = ReadApi(hub, Mapping(namespace))

    def answer(request: Request) -> Response:
        try:
            return _route(api, request)
        except HubError as exc:
            return exc.response()
        except LorahubError as exc:  # a store problem (a damaged blob...): the client sees it
            log.warning("serving %s: %s", request.url.path, exc)
            return HubError(500 if not isinstance(exc, InvalidInput) else 400, str(exc)).response()

    async def endpoint(request: Request) -> Response:
        return await run_in_threadpool(answer, request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        hub.close()

    return Starlette(
        routes=[Route("/{path:path}", endpoint, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])],
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """The app over the store ``LORAHUB_HOME`` names: what each ``--workers`` process builds
    (uvicorn's ``factory``)."""
    from ..hub import Hub

    return create_app(Hub(), os.environ.get(NAMESPACE_ENV, "local"))
