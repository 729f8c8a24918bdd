"""The read half of the Hub HTTP API over a store, as a Starlette app (``lorahub serve``).

What ``huggingface_hub`` asks and what it checks are in ``HUB-PROTOCOL.md``; the routes:

* ``GET /api/models/{ns}/{name}[/revision/{rev}]``: model info (``sha``, ``siblings``,
  ``cardData``, ``tags``); ``?blobs=True`` adds sizes and LFS facts.
* ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]``, ``GET .../refs``.
* ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{file}``: the file, answered directly (no
  redirect); the weights are the store's blob, sent with ``sendfile``, ``Range`` honoured,
  with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
* ``GET /api/models`` (``search``, ``author``, ``filter``; only namespaces the caller may
  read), ``GET /api/whoami-v2`` (the token's name and role; 401 without a token).

Access (``auth.py``): ``Authorization: Bearer <token>`` from ``lorahub token add``; anonymous
reads only with ``--allow-anonymous``; downloads in a ``--gated`` namespace need a token.

The raw path is split on ``/`` before each segment is percent-decoded, as the client quotes a
revision into one segment. Errors carry ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``), which is what the client maps to its exception
classes; bad input (a ``..``, a slash or a NUL where a name goes) is a 400. No Xet header is
ever sent. Over a SQLite catalog, an answer kept while the catalog stands (``kept.py``), a
model info and a ``HEAD`` of the weights are given from the event loop (:func:`_on_loop`); the
rest run in threads (``lanes.py``: a few for metadata, the pool for downloads); the store
allows concurrent readers.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..catalog.plain import keep_connections
from ..errors import DiskFull, InvalidInput, LorahubError
from .auth import Auth, Caller
from .errors import HubError, repo_not_found
from .files import WEIGHTS, HashNeeded, deferring_hashes
from .kept import NotKept
from .lanes import ReadLanes
from .mapping import MERGED, Mapping
from .read import ReadApi
from .uploads import DEFAULT_MAX_UPLOAD, Uploads
from .web import WebPages, is_page
from .write import WriteApi

if TYPE_CHECKING:
    from ..hub import Hub
    from .merged import MergedRevision

log = logging.getLogger(__name__)

#: Where ``lorahub serve --workers N`` passes the namespace to each worker process.
NAMESPACE_ENV = "LORAHUB_SERVE_NAMESPACE"
#: ... and whether anonymous reads are allowed ("1").
ANONYMOUS_ENV = "LORAHUB_SERVE_ANONYMOUS"
#: ... and the ``--gated`` namespaces, comma-separated.
GATED_ENV = "LORAHUB_SERVE_GATED"
#: ... and ``--max-upload-size`` in bytes.
MAX_UPLOAD_ENV = "LORAHUB_SERVE_MAX_UPLOAD"


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


def _route(api: ReadApi, auth: Auth, request: Request) -> Response:
    s = _segments(request)
    method = request.method
    if method not in ("GET", "HEAD"):
        raise HubError(405, f"{method} is not a read")  # writes: WriteApi.handle
    caller = auth.caller(request)
    try:
        return _answer(api, auth, caller, request, s)
    except HubError as exc:
        if exc.code == "RepoNotFound" and caller.authenticated:
            raise repo_not_found(authenticated=True) from None  # 404 to a token, as the Hub
        raise


def _on_loop(api: ReadApi, auth: Auth, request: Request, s: list[str]) -> Response | None:
    """The read's answer when the event loop may give it itself, else None (a thread then
    computes it: ``lanes.py``). On the loop: a kept answer (``kept.py``), or one of the two
    reads every download starts with, a model info without ``blobs`` and a ``HEAD`` of the
    weights (a few indexed reads of a local SQLite catalog: less time than handing them to
    a thread), for a caller known without the catalog. Anything else, an error or a blob to
    hash included, is left to a thread."""
    caller = auth.known_caller(request)
    if caller is None:
        return None
    try:
        with deferring_hashes():
            return _answer(api, auth, caller, request, s, on_loop=True)
    except (NotKept, HashNeeded, LorahubError, HubError):
        return None


def _answer(
    api: ReadApi,
    auth: Auth,
    caller: Caller,
    request: Request,
    s: list[str],
    on_loop: bool = False,
) -> Response:
    """The read's answer; ``on_loop``, only a kept or a quick one (else :class:`NotKept`)."""
    method = request.method
    # After each route's access check: the answer is then the same for every caller.
    quick = api.kept.answer
    kept = api.kept.peek if on_loop else api.kept.answer  # the other routes, on the loop
    merged = _adapters_only if on_loop else api.merged.answer
    if s[:1] == ["api"]:
        if s == ["api", "whoami-v2"]:
            return JSONResponse(auth.whoami(caller))
        if s == ["api", "agent-harnesses"]:
            return JSONResponse({"standardEnvVars": [], "harnesses": {}})
        if s == ["api", "models"] or s == ["api", "models", ""]:
            if on_loop:
                raise NotKept(s)
            return api.list_models(request.query_params, lambda ns: auth.can_read(caller, ns))
        if len(s) >= 4 and s[1] == "models":
            ns, name, rest = s[2], s[3], s[4:]
            auth.may_read(caller, ns)
            if not rest:
                blobs = _true(request, "blobs")
                return (kept if blobs else quick)(
                    ("info", ns, name, "main", blobs),
                    lambda: api.model_info(ns, name, "main", blobs),
                )
            if rest[0] == "revision" and len(rest) == 2:
                blobs = _true(request, "blobs")
                return merged(
                    ns,
                    name,
                    rest[1],
                    lambda: (kept if blobs else quick)(
                        ("info", ns, name, rest[1], blobs),
                        lambda: api.model_info(ns, name, rest[1], blobs),
                    ),
                    lambda merged: api.merged.model_info(merged, blobs),
                )
            if rest[0] == "tree" and len(rest) >= 2:
                sub = "/".join(rest[2:])
                return merged(
                    ns,
                    name,
                    rest[1],
                    lambda: kept(
                        ("tree", ns, name, rest[1], sub), lambda: api.tree(ns, name, rest[1], sub)
                    ),
                    lambda merged: api.merged.tree(merged, sub),
                )
            if rest == ["refs"]:
                return kept(("refs", ns, name), lambda: api.refs(ns, name))
            if rest[0] in ("xet-read-token", "xet-write-token"):
                raise HubError(404, "lorahub serve does not serve Xet; set HF_HUB_DISABLE_XET=1")
        raise HubError(404, f"no such API route: /{'/'.join(s)}")
    if len(s) >= 5 and s[2] == "resolve":
        auth.may_download(caller, s[0])
        path = "/".join(s[4:])
        return merged(
            s[0],
            s[1],
            s[3],
            lambda: (quick if method == "HEAD" and path == WEIGHTS else kept)(
                ("resolve", s[0], s[1], s[3], path, method),
                lambda: api.resolve(s[0], s[1], s[3], path, head=method == "HEAD"),
            ),
            lambda merged: api.merged.resolve(merged, path, head=method == "HEAD"),
        )
    raise HubError(404, "not found")


def _adapters_only(
    ns: str,
    name: str,
    revision: str,
    adapter: Callable[[], Response],
    merged: Callable[[MergedRevision], Response],
) -> Response:
    """``MergedRepos.answer`` on the event loop: a merged revision is never kept, and
    finding it reads the catalog."""
    if MERGED in revision:
        raise NotKept(revision)
    return adapter()


def _local_wal(hub: Hub) -> bool:
    """Whether the catalog is a local SQLite file in WAL mode, whose reads take tens of µs
    and never wait on a writer: the event loop may then run them (not a round trip to a
    database server, nor a rollback journal's wait for a commit)."""
    engine = hub.engine
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() == "wal"


def _warm_imports() -> None:
    """Import now what a first model info needs (the Hub client's card and repo-id code,
    a tenth of a second): not on the event loop, in the first request."""
    from huggingface_hub import ModelCardData  # noqa: F401
    from huggingface_hub.utils import validate_repo_id  # noqa: F401


def _true(request: Request, key: str) -> bool:
    return request.query_params.get(key, "").lower() in ("1", "true")


def create_app(
    hub: Hub,
    namespace: str = "local",
    *,
    allow_anonymous: bool = False,
    gated: Iterable[str] = (),
    max_upload_size: int = DEFAULT_MAX_UPLOAD,
    freeze_gc: bool = False,
) -> Starlette:
    """The Starlette app serving ``hub``'s store; names without a namespace appear under
    ``namespace``; anonymous callers may read only with ``allow_anonymous``; downloads from
    a ``gated`` namespace need a token for it (``hub``'s tokens: ``lorahub token``). Writes
    (``write.py``) need a write token; an uploaded file over ``max_upload_size`` bytes is
    refused while it streams. ``freeze_gc``: at startup, ``gc.freeze()`` what the process
    holds (a process of its own, as ``lorahub serve``'s: it shortens every full collection;
    an app embedding this one keeps its collector as it is).

    Example:
        >>> uvicorn.run(create_app(lorahub.open(), allow_anonymous=True))  # doctest: +SKIP
    """
    api = ReadApi(hub, Mapping(namespace))
    auth = Auth(hub, allow_anonymous, gated)
    uploads = Uploads(hub.home / "tmp", hub.home / "serve", max_upload_size)
    writes = WriteApi(hub, api, auth, uploads)
    pages = WebPages(hub, api.mapping, auth)  # /ui/...: web/pages.py

    def read(request: Request) -> Response:
        try:
            return _route(api, auth, request)
        except HubError as exc:  # a repo created empty answers as the Hub's fresh repos do
            found = writes.not_found(request, exc, _segments(request))
            if found is None:
                raise
            return found

    lanes = ReadLanes(read)
    inline = _local_wal(hub)

    async def endpoint(request: Request) -> Response:
        try:
            if is_page(segments := _segments(request), request.method):
                return await pages.handle(request, segments)
            if request.method in ("GET", "HEAD"):
                if inline and (quick := _on_loop(api, auth, request, segments)) is not None:
                    return quick
                return await lanes(request, segments)
            return await writes.handle(request, _segments(request))
        except HubError as exc:
            error = exc
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        except LorahubError as exc:  # a store problem (a damaged blob...): the client sees it
            log.warning("serving %s: %s", request.url.path, exc)
            status = (
                507 if isinstance(exc, DiskFull) else 400 if isinstance(exc, InvalidInput) else 500
            )
            error = HubError(status, str(exc))
        response = error.response()
        if request.method not in ("GET", "HEAD"):
            # The rest of a refused upload is never read: closing stops the client sending it.
            response.headers["Connection"] = "close"
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(uploads.collect)  # a killed server's, abandoned pushes
        await run_in_threadpool(_warm_imports)
        keep_connections()  # this thread, the event loop's, runs the quick reads
        if freeze_gc:
            # What is loaded now (modules, the catalog's engine) lives as long as the
            # process: out of the collector's sight, a full collection scans only what
            # requests made, not the few hundred thousand objects of the libraries.
            gc.collect()
            gc.freeze()
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

    return create_app(
        Hub(),
        os.environ.get(NAMESPACE_ENV, "local"),
        allow_anonymous=os.environ.get(ANONYMOUS_ENV) == "1",
        gated=[g for g in os.environ.get(GATED_ENV, "").split(",") if g],
        max_upload_size=int(os.environ.get(MAX_UPLOAD_ENV) or DEFAULT_MAX_UPLOAD),
        freeze_gc=True,
    )
