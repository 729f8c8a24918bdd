"""An in-memory Hugging Face Hub look-alike on 127.0.0.1, for tests.

lorahub pushes and pulls adapters with the real ``huggingface_hub`` client. No test machine can
reach the real Hub, and mocking the client would only test our assumptions about it, so this module
speaks the Hub's HTTP protocol instead: the client under test runs unmodified and every request it
makes crosses a real socket. The wire protocol it implements is described in
``shared/HUB-PROTOCOL.md``; the points where a look-alike most easily goes wrong are called out
where they are handled below.

The server keeps git-like state (commits with parents, branches, tags, a per-repo LFS object store)
so that revision semantics, "skip unchanged files" and cache behaviour can be asserted. It records
every request so that tests can state what crossed the wire, and it has hooks to behave like a
hostile remote.

Only the standard library is used, so the server cannot drift with the project's dependencies.

Typical use::

    with HubServer() as hub:
        hub.add_token("hf_alice", "alice")
        api = HfApi(endpoint=hub.url, token="hf_alice")
        ...

Clients must run with Xet disabled (``HF_HUB_DISABLE_XET=1`` before importing ``huggingface_hub``,
or ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``): this server does not implement Xet
storage and answers the Xet token routes with an explicit 404 so that a forgotten switch fails
loudly.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["DEFAULT_GITATTRIBUTES", "HubServer", "RecordedRequest"]

RepoType = Literal["model", "dataset", "space"]
Gated = Literal[False, "auto", "manual"]

#: Plural used in ``/api/{plural}/...`` URLs and prefix used in file URLs, per repo type.
_REPO_TYPES: dict[str, tuple[str, str]] = {
    "model": ("models", ""),
    "dataset": ("datasets", "datasets/"),
    "space": ("spaces", "spaces/"),
}
_TYPE_BY_PLURAL = {plural: repo_type for repo_type, (plural, _) in _REPO_TYPES.items()}
_TYPE_BY_PREFIX = {"datasets": "dataset", "spaces": "space"}

#: The Hub stores a file in LFS when it is at least this large, whatever its name or content.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
#: Weight files always go to LFS here, even in a repo whose ``.gitattributes`` forgot them, so tests
#: about adapter weights never depend on what a seeded ``.gitattributes`` says.
ALWAYS_LFS_SUFFIXES = (".safetensors", ".bin")
#: The Hub looks at this many leading bytes (the preupload "sample") to decide whether a file is
#: binary.
SAMPLE_SIZE = 512

_LFS_RULE = "filter=lfs diff=lfs merge=lfs -text"
#: The ``.gitattributes`` the Hub puts in the initial commit of every new repo (abridged: the
#: patterns that matter for model and adapter files).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} {_LFS_RULE}\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar",
        "*.tar.*",
        "*.tflite",
        "*.tgz",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def _git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob: the Hub's ETag and preupload oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _timestamp(moment: datetime) -> str:
    """The Hub's timestamp format (milliseconds, ``Z`` suffix), which the client parses strictly."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _split_repo_id(repo_id: str) -> tuple[str, str]:
    namespace, sep, name = repo_id.partition("/")
    if not sep or not _NAME_RE.match(namespace) or not _NAME_RE.match(name):
        raise ValueError(f"repo id must be 'namespace/name' with Hub-valid names, got {repo_id!r}")
    if "--" in repo_id or ".." in repo_id:
        raise ValueError(f"repo id must not contain '--' or '..', got {repo_id!r}")
    return namespace, name


def _check_repo_type(repo_type: str) -> RepoType:
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"unknown repo type {repo_type!r}")
    return cast(RepoType, repo_type)


def _lfs_patterns(gitattributes: str) -> list[str]:
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _matches_gitattributes(path: str, pattern: str) -> bool:
    """Approximate gitattributes matching (``fnmatch``'s ``*`` crosses ``/``, covering ``**``)."""
    if "/" not in pattern.strip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern.strip("/"))
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def _wants_lfs(path: str, size: int, sample: bytes, gitattributes: str | None) -> bool:
    """Decide regular versus LFS storage the way the Hub does (rule, size or binary content)."""
    if (
        path.endswith(ALWAYS_LFS_SUFFIXES)
        or size >= LFS_SIZE_THRESHOLD
        or b"\0" in sample[:SAMPLE_SIZE]
    ):
        return True
    return any(
        _matches_gitattributes(path, pattern) for pattern in _lfs_patterns(gitattributes or "")
    )


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Resolve a single ``bytes=`` range to ``(start, end_exclusive)``.

    Returns None for forms the server chooses to ignore (other units, several ranges), in which case
    the whole file is served with 200, as RFC 9110 allows. Raises 416 for a range outside the file.
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
        else:
            start, end = max(size - int(last), 0), size
    except ValueError:
        return None
    if start >= size or start >= end or start < 0:
        raise _HubError(
            416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


def _header_safe(value: str) -> str:
    """Header values must be latin-1 and single-line; seeded hostile file names may be neither."""
    escaped = value.encode("ascii", "backslashreplace").decode("ascii")
    return escaped.replace("\r", "\\r").replace("\n", "\\n")


@dataclass(frozen=True)
class _Blob:
    """File content at a commit, with how the Hub would store it."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The git-lfs pointer that stands for an LFS file in git; its oid is the file's git oid."""
        return (
            "version https://git-lfs.github.com/spec/v1\n"
            f"oid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @cached_property
    def git_oid(self) -> str:
        return _git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    files: Mapping[str, _Blob]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class _Repo:
    repo_type: RepoType
    repo_id: str
    private: bool
    gated: Gated
    created_at: datetime
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    #: Uploaded LFS objects by sha256. Per repo, as on the Hub, so a commit cannot reference content
    #: that was only ever uploaded to another repo.
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    #: Users allowed through the gate of a gated repo, besides its owners.
    approved: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        return _REPO_TYPES[self.repo_type][1] + self.repo_id


@dataclass(frozen=True)
class _Token:
    user: str
    can_write: bool
    orgs: frozenset[str]

    def owns(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, kept so that tests can assert what crossed the wire.

    ``path`` is the raw, still percent-encoded path; ``headers`` has lower-cased names.
    ``response_length`` is the number of body bytes the server sent back (0 for HEAD).
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body_length: int
    status: int
    response_length: int


@dataclass
class _Request:
    method: str
    raw_path: str
    segments: list[str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise _HubError(400, "Request body is not valid JSON") from None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    #: Content-Length to announce on HEAD when it differs from ``len(body)``: a HEAD always
    #: describes the stored file, even when a hostile-remote hook alters what GET sends.
    head_length: int | None = None
    #: Whether the body is LFS file content, counted in ``HubServer.bytes_downloaded``.
    lfs_payload: bool = False

    @classmethod
    def json_body(
        cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> _Response:
        return cls(status, json.dumps(payload).encode(), dict(headers or {}))


class _HubError(Exception):
    """An error answer; the client picks its exception from ``X-Error-Code`` (HEAD has no body)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Response.json_body({"error": self.message, **self.extra}, self.status, headers)


def _repo_not_found(authenticated: bool) -> _HubError:
    # The Hub answers 401 to anonymous callers so that they know logging in might help, and 404
    # otherwise; both say RepoNotFound so that a private repo is indistinguishable from a missing
    # one.
    return _HubError(401 if not authenticated else 404, "Repository not found", code="RepoNotFound")


def _revision_not_found(revision: str) -> _HubError:
    return _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def _entry_not_found(path: str, commit: str | None = None) -> _HubError:
    # X-Repo-Commit lets the client cache the absence (.no_exist/<sha>/<path>).
    headers = {"X-Repo-Commit": commit} if commit else {}
    return _HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so that stopping the server also ends idle keep-alive connections.

    Without that, connections pooled by the client would keep handler threads blocked after
    :meth:`HubServer.stop`, and a later request on them would hang instead of failing at once.
    """

    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP into ``_Request``/``_Response``, keeping the Hub logic free of socket handling."""

    # httpx2 keeps connections alive, so every answer needs HTTP/1.1 framing with a Content-Length.
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read ``HubServer.requests`` instead of stderr."""

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            response = _HubError(400, "Malformed request body").response()
            body = b""
        else:
            # Split before decoding, so that an encoded "%2F" stays inside its segment (revisions,
            # tree paths).
            segments = [unquote(segment) for segment in split.path.split("/")[1:]]
            request = _Request(self.command, split.path, segments, query, headers, body)
            response = hub._handle(request)
        head = self.command == "HEAD"
        length = len(response.body)
        if head and response.head_length is not None:
            length = response.head_length
        # Record before answering: once the client has its answer, the test may already be reading
        # the log.
        hub._record(
            RecordedRequest(
                method=self.command,
                path=split.path,
                query=query,
                headers=headers,
                body_length=len(body),
                status=response.status,
                response_length=0 if head else len(response.body),
            ),
            downloaded=len(response.body) if response.lfs_payload and not head else 0,
        )
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, _header_safe(value))
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not head:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return b"".join(self._read_chunks())
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunks(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # discard trailers
                return
            yield self.rfile.read(size)
            self.rfile.readline(1024)


class HubServer:
    """A Hub-compatible server for the real ``huggingface_hub`` client, bound to 127.0.0.1.

    State lives in memory and dies with the object. Repos are addressed as ``"namespace/name"``;
    reads of public repos are anonymous, everything else needs a token registered with
    :meth:`add_token`.

    LFS files are served the way the Hub serves them: ``/resolve`` answers 302 to a signed URL on
    the *other* loopback name (``localhost`` when the client came in through ``127.0.0.1`` and vice
    versa). That is a different origin, so the client drops its Authorization header exactly as it
    does for the Hub's CDN, and tests see the same request pattern as production.

    Hostile-remote hooks (plain dicts, keyed by path in repo, applying to every repo and revision):

    - ``truncate_downloads[path] = n``: GET sends at most ``n`` bytes of the file, correctly
      framed, while HEAD and the LFS redirect still advertise the full size.
    - ``replace_downloads[path] = data``: GET sends ``data`` while all metadata (ETag, sha256,
      size) still describes the stored file.
    - :meth:`seed_repo` stores file names verbatim, so a tree listing can hold ``../x`` or
      ``/etc/x``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._tokens: dict[str, _Token] = {}
        self._secret = secrets.token_bytes(32)
        self._commit_counter = 0
        self._log: list[RecordedRequest] = []
        self._bytes_downloaded = 0
        self._bytes_uploaded = 0
        self._errors: list[str] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.truncate_downloads: dict[str, int] = {}
        self.replace_downloads: dict[str, bytes] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Listen on a free port of 127.0.0.1, serving from a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running")
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hubserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; idempotent. The in-memory state is kept, so it can still be inspected."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to give the client (``HfApi(endpoint=...)``, ``endpoint=`` on downloads)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test set-up

    def add_token(
        self, token: str, user: str, *, can_write: bool = True, orgs: Iterable[str] = ()
    ) -> None:
        """Register a bearer token for ``user``, who owns the namespaces ``user`` and ``orgs``."""
        with self._lock:
            self._tokens[token] = _Token(user, can_write, frozenset(orgs))

    def seed_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool | Gated = False,
        tag: str | None = None,
        message: str = "Seed files",
    ) -> str:
        """Put files in a repo directly, bypassing the upload protocol; returns the new commit sha.

        The repo is created if needed, like ``create_repo`` (initial commit with
        ``.gitattributes``). The new commit on ``main`` holds exactly ``files``, plus the current
        ``.gitattributes`` unless ``files`` has one. Paths are not validated, so hostile names can
        be planted. ``private`` and ``gated`` always overwrite the repo's flags; ``gated=True``
        means ``"auto"``.
        """
        kind = _check_repo_type(repo_type)
        _split_repo_id(repo_id)
        gate: Gated = "auto" if gated is True else gated
        with self._lock:
            repo = self._repos.get((kind, repo_id)) or self._create_repo(
                kind, repo_id, private=private
            )
            if tag is not None and tag in repo.tags:
                raise ValueError(f"tag {tag!r} already exists in {repo_id}")
            repo.private, repo.gated = private, gate
            head = repo.commits[repo.branches["main"]]
            tree = dict(files)
            if ".gitattributes" not in tree and ".gitattributes" in head.files:
                tree[".gitattributes"] = head.files[".gitattributes"].data
            attributes = tree.get(".gitattributes", b"").decode("utf-8", "replace")
            blobs = {
                path: _Blob(data, _wants_lfs(path, len(data), data, attributes))
                for path, data in tree.items()
            }
            for blob in blobs.values():
                if blob.lfs:
                    repo.lfs_objects[blob.sha256] = blob.data
            commit = self._commit(repo, head.sha, blobs, message, "", author="seed")
            repo.branches["main"] = commit.sha
            if tag is not None:
                repo.tags[tag] = commit.sha
            return commit.sha

    def grant_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Let ``user`` through the gate of a gated repo, as accepting its conditions would."""
        with self._lock:
            self._get_repo(_check_repo_type(repo_type), repo_id).approved.add(user)

    # ------------------------------------------------------------------ inspection

    def commit_sha(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """The commit a branch, tag or sha names, as the server resolves it."""
        with self._lock:
            return self._resolve(self._get_repo(_check_repo_type(repo_type), repo_id), revision).sha

    def repo_files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The files of a revision, to check what an upload really stored."""
        with self._lock:
            commit = self._resolve(self._get_repo(_check_repo_type(repo_type), repo_id), revision)
            return {path: blob.data for path, blob in commit.files.items()}

    def lfs_paths(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model"
    ) -> set[str]:
        """The files of a revision stored in LFS, to check the server's regular/LFS decision."""
        with self._lock:
            commit = self._resolve(self._get_repo(_check_repo_type(repo_type), repo_id), revision)
            return {path for path, blob in commit.files.items() if blob.lfs}

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Forget logged requests and reset the byte counters, to measure one operation alone."""
        with self._lock:
            self._log.clear()
            self._bytes_downloaded = self._bytes_uploaded = 0

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """Logged requests with this method (any if None) whose raw path contains the text."""
        return sum(
            1
            for record in self.requests
            if (method is None or record.method == method.upper()) and path_contains in record.path
        )

    @property
    def bytes_downloaded(self) -> int:
        """LFS file bytes sent by GET on the signed download route since :meth:`clear_log`."""
        with self._lock:
            return self._bytes_downloaded

    @property
    def bytes_uploaded(self) -> int:
        """Bytes received by LFS upload PUTs since the last :meth:`clear_log`, accepted or not."""
        with self._lock:
            return self._bytes_uploaded

    @property
    def errors(self) -> list[str]:
        """Tracebacks of server bugs (answered with 500); a test can assert this stays empty."""
        with self._lock:
            return list(self._errors)

    # ------------------------------------------------------------------ request plumbing

    def _record(self, record: RecordedRequest, *, downloaded: int) -> None:
        with self._lock:
            self._log.append(record)
            self._bytes_downloaded += downloaded

    def _handle(self, request: _Request) -> _Response:
        # One lock for the whole of a request's logic keeps state consistent under the client's
        # download threads; responses are built in memory and sent after the lock is released.
        with self._lock:
            try:
                return self._route(request)
            except _HubError as error:
                return error.response()
            except Exception:
                self._errors.append(traceback.format_exc())
                return _HubError(500, "Internal error in the test Hub server").response()

    def _origins(self, request: _Request) -> tuple[str, str]:
        """The origin the client addressed, and the other loopback origin that plays the CDN."""
        host = request.headers.get("host", "").rsplit(":", 1)[0]
        here, there = (
            ("localhost", "127.0.0.1") if host == "localhost" else ("127.0.0.1", "localhost")
        )
        return f"http://{here}:{self.port}", f"http://{there}:{self.port}"

    def _sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    def _check_signature(self, request: _Request, *parts: str) -> None:
        if not hmac.compare_digest(request.query.get("sig", ""), self._sign(*parts)):
            raise _HubError(403, "Invalid or missing signature")

    def _route(self, request: _Request) -> _Response:
        segments, method = request.segments, request.method
        if segments[:1] == ["api"]:
            return self._route_api(request, segments[1:])
        if segments[:2] == ["_lfs", "upload"] and len(segments) == 7 and method == "PUT":
            return self._lfs_upload(request, *segments[2:])
        if segments[:2] == ["_lfs", "verify"] and len(segments) == 6 and method == "POST":
            return self._lfs_verify(request, *segments[2:])
        if segments[:1] == ["_cdn"] and len(segments) == 5 and method in ("GET", "HEAD"):
            return self._cdn(request, *segments[1:])
        repo_type = _TYPE_BY_PREFIX.get(segments[0], "model") if segments else "model"
        rest = segments[1:] if repo_type != "model" else segments
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(
                request, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:])
            )
        lfs_batch = len(rest) == 6 and rest[2:] == ["info", "lfs", "objects", "batch"]
        if lfs_batch and rest[1].endswith(".git") and method == "POST":
            return self._lfs_batch(request, repo_type, f"{rest[0]}/{rest[1].removesuffix('.git')}")
        raise _HubError(404, f"No route for {method} {request.raw_path}")

    def _route_api(self, request: _Request, segments: list[str]) -> _Response:
        method = request.method
        simple: dict[tuple[str, str], Callable[[_Request], _Response]] = {
            ("GET", "whoami-v2"): self._whoami,
            ("GET", "agent-harnesses"): lambda _request: _Response.json_body(
                {"standardEnvVars": [], "harnesses": {}}
            ),
            ("POST", "validate-yaml"): lambda _request: _Response.json_body(
                {"errors": [], "warnings": []}
            ),
            ("POST", "repos/create"): self._create_repo_route,
            ("DELETE", "repos/delete"): self._delete_repo_route,
        }
        handler = simple.get((method, "/".join(segments)))
        if handler is not None:
            return handler(request)
        if len(segments) < 3 or segments[0] not in _TYPE_BY_PLURAL:
            raise _HubError(404, f"No route for {method} {request.raw_path}")
        repo_type, repo_id, action, args = (
            _TYPE_BY_PLURAL[segments[0]],
            f"{segments[1]}/{segments[2]}",
            segments[3] if len(segments) > 3 else "",
            segments[4:],
        )
        if action in ("xet-write-token", "xet-read-token"):
            raise _HubError(
                404,
                "Xet is not served by the test Hub server: "
                "set HF_HUB_DISABLE_XET=1 before importing the client",
            )
        routes: dict[tuple[str, str, int], Callable[..., _Response]] = {
            ("GET", "", 0): self._info,
            ("GET", "revision", 1): self._info,
            ("GET", "refs", 0): self._refs,
            ("GET", "commits", 1): self._commits,
            ("POST", "tag", 1): self._create_tag,
            ("DELETE", "tag", 1): self._delete_tag,
            ("POST", "branch", 1): self._create_branch,
            ("DELETE", "branch", 1): self._delete_branch,
            ("POST", "preupload", 1): self._preupload,
            ("POST", "commit", 1): self._commit_route,
            ("POST", "paths-info", 1): self._paths_info,
            ("PUT", "settings", 0): self._settings,
        }
        if method in ("GET", "HEAD") and action == "tree" and args:
            return self._tree(request, repo_type, repo_id, args[0], "/".join(args[1:]).strip("/"))
        route = routes.get(("GET" if method == "HEAD" else method, action, len(args)))
        if route is None:
            raise _HubError(404, f"No route for {method} {request.raw_path}")
        return route(request, repo_type, repo_id, *args)

    # ------------------------------------------------------------------ state helpers

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def _caller(self, request: _Request) -> _Token | None:
        """Who is calling; an unknown token is an error on every route, as on the Hub."""
        authorization = request.headers.get("authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        caller = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise _HubError(401, _INVALID_CREDENTIALS)
        return caller

    def _readable(
        self, request: _Request, repo_type: str, repo_id: str
    ) -> tuple[_Repo, _Token | None]:
        caller = self._caller(request)
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not (caller and caller.owns(repo.namespace))):
            raise _repo_not_found(caller is not None)
        return repo, caller

    def _writable(self, request: _Request, repo_type: str, repo_id: str) -> tuple[_Repo, _Token]:
        repo, caller = self._readable(request, repo_type, repo_id)
        return repo, self._require_writer(caller, repo.namespace)

    @staticmethod
    def _require_writer(caller: _Token | None, namespace: str) -> _Token:
        if caller is None:
            raise _HubError(401, "You must be authenticated to do this")
        if not caller.can_write:
            raise _HubError(403, "This token has read access only")
        if not caller.owns(namespace):
            raise _HubError(403, f"You don't have the rights to write to {namespace}")
        return caller

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        """Resolve a branch, tag (plain or ``refs/...``) or full commit sha."""
        name = revision
        for prefix, refs in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs:
                return repo.commits[refs[revision[len(prefix) :]]]
        sha = repo.branches.get(name) or repo.tags.get(name)
        if sha is None and _COMMIT_RE.match(name) and name in repo.commits:
            sha = name
        if sha is None:
            raise _revision_not_found(revision)
        return repo.commits[sha]

    def _commit(
        self,
        repo: _Repo,
        parent: str | None,
        files: Mapping[str, _Blob],
        title: str,
        message: str,
        author: str,
    ) -> _Commit:
        """Record a commit; its sha hashes content and a counter, as git's hashes a timestamp."""
        self._commit_counter += 1
        date = datetime.now(timezone.utc)
        tree = hashlib.sha1(
            "".join(f"{path}\0{blob.git_oid}\n" for path, blob in sorted(files.items())).encode()
        )
        text = (
            f"tree {tree.hexdigest()}\nparent {parent}\n"
            f"author {author} {date.isoformat()}\n{self._commit_counter}"
        )
        sha = hashlib.sha1(
            f"{repo.repo_type}/{repo.repo_id}\n{text}\n\n{title}\n\n{message}".encode()
        ).hexdigest()
        commit = _Commit(sha, parent, dict(files), title, message, author, date)
        repo.commits[sha] = commit
        return commit

    def _create_repo(self, repo_type: RepoType, repo_id: str, *, private: bool) -> _Repo:
        """A new repo with the initial commit the Hub makes, which holds only ``.gitattributes``."""
        repo = _Repo(repo_type, repo_id, private, False, datetime.now(timezone.utc))
        attributes = _Blob(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
        repo.branches["main"] = self._commit(
            repo, None, {".gitattributes": attributes}, "initial commit", "", "hub"
        ).sha
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _approved(self, repo: _Repo, caller: _Token | None) -> bool:
        return not repo.gated or (
            caller is not None and (caller.owns(repo.namespace) or caller.user in repo.approved)
        )

    # ------------------------------------------------------------------ account and repo management

    def _whoami(self, request: _Request) -> _Response:
        caller = self._caller(request)
        if caller is None:
            raise _HubError(401, "Invalid username or password.")
        return _Response.json_body(
            {
                "type": "user",
                "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
                "name": caller.user,
                "fullname": caller.user,
                "orgs": [{"type": "org", "name": org} for org in sorted(caller.orgs)],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": "test",
                        "role": "write" if caller.can_write else "read",
                    },
                },
            }
        )

    def _repo_target(
        self, request: _Request, payload: Mapping[str, Any]
    ) -> tuple[RepoType, str, _Token]:
        """The repo a create/delete call names; a null organization means the caller's namespace."""
        caller = self._caller(request)
        if caller is None:
            raise _HubError(401, "You must be authenticated to do this")
        name, namespace = payload.get("name"), payload.get("organization") or caller.user
        if not isinstance(name, str):
            raise _HubError(400, "Invalid repo name")
        repo_id = f"{namespace}/{name}"
        try:
            _split_repo_id(repo_id)
            repo_type = _check_repo_type(payload.get("type") or "model")
        except ValueError as error:
            raise _HubError(400, str(error)) from None
        return repo_type, repo_id, caller

    def _create_repo_route(self, request: _Request) -> _Response:
        payload = request.json()
        repo_type, repo_id, caller = self._repo_target(request, payload)
        url = f"{self._origins(request)[0]}/{_REPO_TYPES[repo_type][1]}{repo_id}"
        self._require_writer(caller, repo_id.split("/", 1)[0])
        if (repo_type, repo_id) in self._repos:
            # The client reads "url" from this body when exist_ok=True.
            raise _HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = (
            payload.get("visibility", "private" if payload.get("private") else "public")
            == "private"
        )
        self._create_repo(repo_type, repo_id, private=private)
        return _Response.json_body({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo_route(self, request: _Request) -> _Response:
        repo_type, repo_id, caller = self._repo_target(request, request.json())
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not caller.owns(repo.namespace)):
            raise _repo_not_found(authenticated=True)
        self._require_writer(caller, repo.namespace)
        del self._repos[(repo_type, repo_id)]
        return _Response.json_body({})

    def _settings(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._writable(request, repo_type, repo_id)
        payload = request.json()
        if "gated" in payload:
            if payload["gated"] not in (False, "auto", "manual"):
                raise _HubError(400, "gated must be false, 'auto' or 'manual'")
            repo.gated = payload["gated"]
        if "visibility" in payload:
            if payload["visibility"] not in ("private", "public"):
                raise _HubError(400, "visibility must be 'private' or 'public'")
            repo.private = payload["visibility"] == "private"
        elif isinstance(payload.get("private"), bool):
            repo.private = payload["private"]
        return _Response.json_body({})

    # ------------------------------------------------------------------ reading repos

    def _info(
        self, request: _Request, repo_type: str, repo_id: str, revision: str = "main"
    ) -> _Response:
        repo, _ = self._readable(request, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        with_blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {
                        "size": len(blob.data),
                        "sha256": blob.sha256,
                        "pointerSize": len(blob.pointer),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": commit.sha,
            "lastModified": _timestamp(repo.commits[repo.branches["main"]].date),
            "createdAt": _timestamp(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(blob.data) for blob in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _Response.json_body(info)

    @staticmethod
    def _tree_entries(commit: _Commit) -> dict[str, dict[str, Any]]:
        """Every file and directory of a commit as the tree API lists them, keyed by path."""
        entries: dict[str, dict[str, Any]] = {}
        directories: dict[str, list[str]] = {}
        for path, blob in commit.files.items():
            entry: dict[str, Any] = {
                "type": "file",
                "oid": blob.git_oid,
                "size": len(blob.data),
                "path": path,
            }
            if blob.lfs:
                entry["lfs"] = {
                    "oid": blob.sha256,
                    "size": len(blob.data),
                    "pointerSize": len(blob.pointer),
                }
            entries[path] = entry
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            while parent:
                directories.setdefault(parent, []).append(f"{path}\0{blob.git_oid}")
                parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
        for directory, members in directories.items():
            oid = hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()
            entries.setdefault(
                directory, {"type": "directory", "oid": oid, "size": 0, "path": directory}
            )
        return entries

    def _tree(
        self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str
    ) -> _Response:
        repo, _ = self._readable(request, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        entries = self._tree_entries(commit)
        if path and entries.get(path, {}).get("type") != "directory":
            raise _entry_not_found(path, commit.sha)
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        listed = [
            entry
            for entry_path, entry in sorted(entries.items())
            if entry_path.startswith(prefix)
            and entry_path != path
            and (recursive or "/" not in entry_path[len(prefix) :])
        ]
        # Everything fits in one page: the client follows a Link header only when there is one.
        return _Response.json_body(listed)

    def _paths_info(
        self, request: _Request, repo_type: str, repo_id: str, revision: str
    ) -> _Response:
        repo, _ = self._readable(request, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        entries = self._tree_entries(commit)
        form = parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        wanted = [value.strip("/") for key, value in form if key == "paths"]
        return _Response.json_body([entries[path] for path in wanted if path in entries])

    def _refs(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._readable(request, repo_type, repo_id)

        def refs(kind: str, names: Mapping[str, str]) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
                for name, sha in sorted(names.items())
            ]

        payload: dict[str, Any] = {
            "branches": refs("heads", repo.branches),
            "converts": [],
            "tags": refs("tags", repo.tags),
        }
        if request.query.get("include_prs"):
            payload["pullRequests"] = []
        return _Response.json_body(payload)

    def _commits(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo, _ = self._readable(request, repo_type, repo_id)
        commit: _Commit | None = self._resolve(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "date": _timestamp(commit.date),
                    "authors": [{"user": commit.author}],
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        return _Response.json_body(history)

    # ------------------------------------------------------------------ refs

    def _create_tag(
        self, request: _Request, repo_type: str, repo_id: str, revision: str
    ) -> _Response:
        # The path names the revision to tag; the tag name is in the body.
        repo, _ = self._writable(request, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        tag = request.json().get("tag")
        if not isinstance(tag, str) or not tag or tag.startswith("refs/"):
            raise _HubError(400, "Invalid tag name")
        if tag in repo.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.sha
        return _Response.json_body({})

    def _delete_tag(self, request: _Request, repo_type: str, repo_id: str, tag: str) -> _Response:
        repo, _ = self._writable(request, repo_type, repo_id)
        if repo.tags.pop(tag, None) is None:
            raise _revision_not_found(tag)
        return _Response.json_body({})

    def _create_branch(
        self, request: _Request, repo_type: str, repo_id: str, branch: str
    ) -> _Response:
        repo, caller = self._writable(request, repo_type, repo_id)
        payload = request.json()
        if not branch or branch.startswith("refs/") or _COMMIT_RE.match(branch):
            raise _HubError(400, "Invalid branch name")
        if branch in repo.branches:
            raise _HubError(409, f"Branch {branch} already exists")
        if payload.get("emptyBranch"):
            sha = self._commit(repo, None, {}, "empty branch", "", caller.user).sha
        else:
            sha = self._resolve(repo, payload.get("startingPoint") or "main").sha
        repo.branches[branch] = sha
        return _Response.json_body({})

    def _delete_branch(
        self, request: _Request, repo_type: str, repo_id: str, branch: str
    ) -> _Response:
        repo, _ = self._writable(request, repo_type, repo_id)
        if branch == "main":
            raise _HubError(403, "The default branch cannot be deleted")
        if repo.branches.pop(branch, None) is None:
            raise _revision_not_found(branch)
        return _Response.json_body({})

    # ------------------------------------------------------------------ uploads

    def _branch_head(self, repo: _Repo, revision: str) -> tuple[str, _Commit]:
        """The branch a write targets; tags and shas cannot move, so writes to them are refused."""
        branch = revision.removeprefix("refs/heads/")
        if branch in repo.branches:
            return branch, repo.commits[repo.branches[branch]]
        self._resolve(repo, revision)
        raise _HubError(400, f"Invalid rev id: {revision} is not a branch")

    def _preupload(
        self, request: _Request, repo_type: str, repo_id: str, revision: str
    ) -> _Response:
        repo, _ = self._writable(request, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        attributes = commit.files.get(".gitattributes")
        gitattributes = attributes.data.decode("utf-8", "replace") if attributes else None
        answers = []
        for item in request.json().get("files", []):
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise _HubError(400, "Each file needs a path and an integer size")
            try:
                sample = base64.b64decode(item.get("sample", ""), validate=True)
            except binascii.Error:
                raise _HubError(400, f"Invalid base64 sample for {path}") from None
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if _wants_lfs(path, size, sample, gitattributes) else "regular",
                "shouldIgnore": False,
            }
            # The oid of what is already there is what lets the client skip unchanged files. It must
            # be computed the way the client computes its own: sha256 for LFS, git blob sha1 for
            # regular files.
            existing = commit.files.get(path)
            if existing is not None:
                answer["oid"] = existing.sha256 if existing.lfs else existing.git_oid
            answers.append(answer)
        return _Response.json_body({"files": answers, "commitOid": commit.sha})

    def _lfs_batch(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._writable(request, repo_type, repo_id)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise _HubError(
                400, "Only the upload operation is served; downloads go through /resolve"
            )
        origin = self._origins(request)[0]
        objects = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if (
                not isinstance(oid, str)
                or not _SHA256_RE.match(oid)
                or not isinstance(size, int)
                or size < 0
            ):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            stored = repo.lfs_objects.get(oid)
            if stored is not None and len(stored) == size:
                objects.append(
                    {"oid": oid, "size": size}
                )  # no actions: already stored, nothing to send
                continue
            # The PUT carries no Authorization header, so the URL itself is the credential, bound to
            # the announced object. It must be absolute: the client only rewrites huggingface.co
            # URLs.
            base = f"{origin}/_lfs/{{}}/{repo_type}/{repo_id}/{oid}"
            upload_sig = self._sign("upload", repo_type, repo_id, oid, str(size))
            verify_sig = self._sign("verify", repo_type, repo_id, oid)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": base.format("upload") + f"/{size}?sig={upload_sig}",
                            "header": {},
                        },
                        "verify": {
                            "href": base.format("verify") + f"?sig={verify_sig}",
                            "header": {},
                        },
                    },
                }
            )
        response = _Response.json_body(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        )
        response.content_type = "application/vnd.git-lfs+json"
        return response

    def _lfs_upload(
        self, request: _Request, repo_type: str, namespace: str, name: str, oid: str, size: str
    ) -> _Response:
        repo_id = f"{namespace}/{name}"
        self._check_signature(request, "upload", repo_type, repo_id, oid, size)
        self._bytes_uploaded += len(request.body)
        if len(request.body) != int(size) or hashlib.sha256(request.body).hexdigest() != oid:
            raise _HubError(400, "Uploaded content does not match the announced sha256 and size")
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(authenticated=True)
        repo.lfs_objects[oid] = request.body
        return _Response(200)

    def _lfs_verify(
        self, request: _Request, repo_type: str, namespace: str, name: str, oid: str
    ) -> _Response:
        repo_id = f"{namespace}/{name}"
        self._check_signature(request, "verify", repo_type, repo_id, oid)
        repo, _ = self._writable(request, repo_type, repo_id)
        stored = repo.lfs_objects.get(oid)
        if stored is None or len(stored) != request.json().get("size"):
            raise _HubError(404, f"LFS object {oid} was not uploaded")
        return _Response.json_body({})

    def _commit_route(
        self, request: _Request, repo_type: str, repo_id: str, revision: str
    ) -> _Response:
        repo, caller = self._writable(request, repo_type, repo_id)
        if request.query.get("create_pr", "").lower() in ("1", "true"):
            raise _HubError(400, "Pull requests are not supported by the test Hub server")
        branch, head = self._branch_head(repo, revision)
        try:
            lines = [
                json.loads(line) for line in request.body.decode().splitlines() if line.strip()
            ]
        except ValueError:
            raise _HubError(400, "The commit body must be NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The commit body must start with a header line")
        header = lines[0].get("value") or {}
        parent = header.get("parentCommit")
        if parent and parent != head.sha:
            raise _HubError(412, f"parentCommit {parent} is not the head of {branch} ({head.sha})")
        files = dict(head.files)
        for line in lines[1:]:
            self._apply_operation(repo, files, line.get("key"), line.get("value") or {}, head.sha)
        title = str(header.get("summary") or "Upload files")
        commit = self._commit(
            repo, head.sha, files, title, str(header.get("description") or ""), caller.user
        )
        repo.branches[branch] = commit.sha
        return _Response.json_body(
            {
                "success": True,
                "commitOid": commit.sha,
                # The client parses the repo URL out of this, so it must be on the endpoint it used.
                "commitUrl": f"{self._origins(request)[0]}/{repo.url_path}/commit/{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    @staticmethod
    def _checked_path(value: Mapping[str, Any]) -> str:
        path = value.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
            raise _HubError(400, f"Invalid path in repo: {path!r}")
        if any(part in ("", ".", "..") for part in path.split("/")) or path.split("/")[0] == ".git":
            raise _HubError(400, f"Invalid path in repo: {path!r}")
        return path

    def _apply_operation(
        self, repo: _Repo, files: dict[str, _Blob], key: Any, value: Mapping[str, Any], head: str
    ) -> None:
        path = self._checked_path(value)
        if key == "file":
            try:
                data = base64.b64decode(value.get("content", ""), validate=True)
            except binascii.Error:
                raise _HubError(400, f"Invalid base64 content for {path}") from None
            # Like the Hub, refuse binary or huge content outside LFS; empty files are always
            # regular.
            if data and (len(data) >= LFS_SIZE_THRESHOLD or b"\0" in data[:SAMPLE_SIZE]):
                raise _HubError(400, f"{path} is binary or too large and must be uploaded with LFS")
            files[path] = _Blob(data, lfs=False)
        elif key == "lfsFile":
            oid, size = value.get("oid"), value.get("size")
            stored = repo.lfs_objects.get(oid) if isinstance(oid, str) else None
            if stored is None or (size is not None and size != len(stored)):
                raise _HubError(400, f"LFS object {oid} for {path} was never uploaded to this repo")
            files[path] = _Blob(stored, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise _entry_not_found(path, head)
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [existing for existing in files if existing.startswith(prefix)]
            if not doomed:
                raise _entry_not_found(path, head)
            for existing in doomed:
                del files[existing]
        else:
            raise _HubError(400, f"Unknown commit operation {key!r}")

    # ------------------------------------------------------------------ downloads

    def _resolve_file(
        self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str
    ) -> _Response:
        repo, caller = self._readable(request, repo_type, repo_id)
        if not self._approved(repo, caller):
            raise _HubError(
                401 if caller is None else 403,
                f"Access to {repo_id} is restricted: you must be authenticated and approved.",
                code="GatedRepo",
            )
        commit = self._resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _entry_not_found(path, commit.sha)
        if not blob.lfs:
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.git_oid}"'}
            return self._content(request, path, blob, headers, lfs=False)
        # LFS content lives "elsewhere": a signed URL on the other loopback origin, so the client
        # treats it as a CDN (no auth forwarded, metadata taken from this 302 itself).
        cdn = self._origins(request)[1]
        signature = self._sign("cdn", repo_type, repo_id, blob.sha256, path)
        query = f"filename={quote(path, safe='')}&sig={signature}"
        location = f"{cdn}/_cdn/{repo_type}/{repo_id}/{blob.sha256}?{query}"
        return _Response(
            302,
            headers={
                "Location": location,
                "X-Repo-Commit": commit.sha,
                "ETag": f'"{blob.git_oid}"',
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(len(blob.data)),
            },
            content_type="text/plain",
        )

    def _cdn(
        self, request: _Request, repo_type: str, namespace: str, name: str, oid: str
    ) -> _Response:
        repo_id, path = f"{namespace}/{name}", request.query.get("filename", "")
        self._check_signature(request, "cdn", repo_type, repo_id, oid, path)
        repo = self._repos.get((repo_type, repo_id))
        data = repo.lfs_objects.get(oid) if repo else None
        if data is None:
            raise _HubError(404, "Object not found")
        return self._content(request, path, _Blob(data, lfs=True), {"ETag": f'"{oid}"'}, lfs=True)

    def _content(
        self, request: _Request, path: str, blob: _Blob, headers: dict[str, str], *, lfs: bool
    ) -> _Response:
        """File bytes with Range support, passed through the hostile-remote hooks."""
        content = self.replace_downloads.get(path, blob.data)
        start, end, status = 0, len(content), 200
        range_header = request.headers.get("range")
        if range_header is not None:
            window = _parse_range(range_header, len(content))
            if window is not None:
                (start, end), status = window, 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        body = content[start:end]
        limit = self.truncate_downloads.get(path)
        if limit is not None:
            body = body[: max(limit - start, 0)]
        headers["Accept-Ranges"] = "bytes"
        return _Response(
            status,
            body,
            headers,
            content_type="application/octet-stream",
            head_length=len(blob.data) if status == 200 else end - start,
            lfs_payload=lfs,
        )
