"""The write half of the Hub API: ``create_repo``, preupload, the LFS batch API and its
uploads, the NDJSON commit, tags and branches, so ``upload_folder``, PEFT's
``push_to_hub`` and ``lorahub push --endpoint`` store adapters here.

* A commit is imported like ``lorahub add``: the repo's PEFT folder (the files at the
  parent revision, then the commit's deletions and additions; only the commit's files when
  they hold a config and weights of their own) is assembled in ``tmp/`` and given to
  :meth:`~lorahub.hub.Hub.add` under ``<name>:<tag>``. Anything that is not a LoRA adapter
  is refused with a 422 whose message the client shows, and nothing is stored. A repo holds
  one adapter folder at its root: files in subfolders are refused.
* Revisions are tags: a commit to ``main`` moves ``name:latest``, one to ``v2`` moves (or
  makes) ``name:v2``; ``create_branch`` and ``create_tag`` both tag the adapter of their
  starting revision. A ``parentCommit`` that is no longer the revision's head gets a 412.
* A repo exists once it holds an adapter. ``create_repo`` of a new repo also leaves a
  marker (``serve/repos/<ns>/<name>`` in the store), so until its first commit the repo
  answers as the Hub's fresh repos do (no files, a fixed commit id): clients that look
  for a model card before uploading (``push_to_hub``) need that.
* A commit whose ``lorahub.json`` is not part of it, but whose config or weights are, drops
  the parent's ``lorahub.json``: it described the old adapter.
* The caller's token and write right are checked before a byte of a body is read, so an
  anonymous or read-only client cannot make the server buffer anything; JSON bodies are
  capped at :data:`JSON_CAP`, a commit at :data:`COMMIT_CAP` (its regular files are the
  small ones: the rest goes through LFS, capped by ``--max-upload-size``) and parsed line
  by line as it arrives.
* A commit's check of ``parentCommit`` and its import, and a new tag's or branch's check
  and creation, run under the repo's lock (``serve/locks/``, a file lock every
  ``--workers`` process shares), so of two commits with the same parent one gets the 412.
* An LFS object counts for a commit when it was uploaded for that repo (``uploads.py``:
  staged per repo) or is the weights of one of the repo's adapters (the committer may
  write there, so may read it); never an object staged for another repo.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import AdapterNotFound, AmbiguousReference, CorruptData, InvalidInput
from ..formats import lorahub_json, peft
from ..refs import validate_tag
from .bodies import chunks, read_body
from .errors import HubError, disk_failure, repo_not_found
from .files import RepoFile
from .mapping import MAIN, commit_id
from .uploads import Uploads, check_oid, parse_size

if TYPE_CHECKING:
    from ..hub import Hub
    from ..info import AdapterInfo
    from .auth import Auth, Caller
    from .read import ReadApi

log = logging.getLogger(__name__)

#: Suffixes uploaded through LFS whatever their size (weights, archives).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".pkl", ".zip")
LFS_THRESHOLD = 10 << 20  # the Hub's: bigger files go through LFS too
JSON_CAP = 1 << 20  # preupload, batch and the small requests
COMMIT_CAP = 64 << 20  # an NDJSON commit: its regular files are under LFS_THRESHOLD
COMMIT_FILES = 1000  # files (added, LFS or deleted) one commit may name
LOCK_WAIT_S = 600.0  # how long a write waits for another one to the same repo
_WEIGHTS = (peft.SAFETENSORS, peft.BIN)
LFS_JSON = "application/vnd.git-lfs+json"


def empty_commit(repo_id: str) -> str:
    """The commit id of a created repo that holds no adapter yet."""
    return hashlib.sha1(f"lorahub-empty:{repo_id}".encode()).hexdigest()


@dataclass(frozen=True)
class _File:
    """A file of the folder a commit makes: its bytes, or a file on disk (LFS)."""

    data: bytes | None = None
    path: Path | None = None


class WriteApi:
    """The write routes over one open Hub, beside the server's :class:`ReadApi`."""

    def __init__(self, hub: Hub, read: ReadApi, auth: Auth, uploads: Uploads) -> None:
        self.hub = hub
        self.read = read
        self.auth = auth
        self.uploads = uploads
        self.markers = Path(hub.home) / "serve" / "repos"
        self.locks = Path(hub.home) / "serve" / "locks"

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: Request, s: list[str]) -> Response:
        """Answer a POST, PUT or DELETE (``s``: the path's decoded segments)."""
        method = request.method
        base = str(request.base_url).rstrip("/")
        if method == "PUT" and len(s) == 5 and s[0] == "lorahub-lfs":
            return await self.put_object(request, s[1], s[2], s[3], s[4])
        if method == "DELETE" and s[:2] in (["api", "repos"], ["api", "models"]):
            raise HubError(
                405, "lorahub serve does not delete over the API: remove adapters with `lorahub rm`"
            )
        route = _write_route(method, s)
        if route is None:
            raise HubError(405, f"{method} /{'/'.join(s)} is not served by lorahub serve")
        kind, ns = route
        # Who may write, before a byte of the body is read (a catalog lookup: in a thread).
        caller = await run_in_threadpool(self.auth.caller, request)
        if ns is not None:
            self.auth.may_write(caller, ns)
        elif not caller.authenticated:
            raise HubError(401, "You must be authenticated to write")
        elif kind == "create" and not caller.can_write:
            raise HubError(403, f"token {caller.name!r} may not write")
        if kind == "validate-yaml":
            await read_body(request, JSON_CAP)
            return JSONResponse({"errors": [], "warnings": []})
        if kind == "commit":
            if request.query_params.get("create_pr") in ("1", "true", "True"):
                raise HubError(400, "lorahub serve has no pull requests: commit directly")
            commit = await _read_commit(request, COMMIT_CAP)
            return await self._sync(self.commit, caller, s[2], s[3], s[5], commit, base)
        body = _json(await read_body(request, JSON_CAP))
        if kind == "create":
            return await self._sync(self.create_repo, caller, body, base)
        if kind == "verify":
            return await self._sync(self.verify, caller, s[2], s[3], body)
        if kind == "batch":
            return await self._sync(self.batch, caller, s[0], s[1][:-4], body, base)
        if kind == "preupload":
            return await self._sync(self.preupload, caller, s[2], s[3], s[5], body)
        if kind == "tag":
            return await self._sync(self.create_tag, caller, s[2], s[3], s[5], body)
        return await self._sync(self.create_branch, caller, s[2], s[3], s[5], body)

    async def _sync(self, fn: Callable[..., Response], *args: Any) -> Response:
        """Run a route's blocking part (the store) in the thread pool."""
        return await run_in_threadpool(fn, *args)

    @contextlib.contextmanager
    def _locked(self, repo_id: str) -> Iterator[None]:
        """Hold ``repo_id``'s write lock, shared by every process serving the store: a
        check of the repo's state and the write that depends on it happen under it."""
        from filelock import FileLock, Timeout

        self.locks.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(repo_id.encode()).hexdigest()[:32]
        lock = FileLock(str(self.locks / f"{key}.lock"), timeout=LOCK_WAIT_S)
        try:
            lock.acquire()
        except Timeout:
            raise HubError(
                409, f"{repo_id} is busy with another write (waited {LOCK_WAIT_S:.0f}s): retry"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ repos

    def _target(self, ns: str, name: str) -> tuple[str, str, list[AdapterInfo]]:
        """``(repo_id, lorahub name, its adapters)``: the name the repo is stored under, or
        for a repo with none, the name a first commit creates (bare in the default
        namespace)."""
        repo_id = f"{ns}/{name}"
        try:
            candidates = self.read.mapping.names(repo_id)
        except InvalidInput as exc:
            raise HubError(400, str(exc)) from None
        for candidate in candidates:
            infos = self.hub.list_adapters([f"name={candidate}"])
            if infos:
                return repo_id, candidate, infos
        return repo_id, candidates[0], []

    def _marker(self, repo_id: str) -> Path:
        return self.markers / repo_id  # both parts checked by Mapping.names

    def is_empty_repo(self, ns: str, name: str) -> bool:
        """Whether ``ns/name`` was created here and holds no adapter yet."""
        repo_id = f"{ns}/{name}"
        try:
            self.read.mapping.names(repo_id)
        except InvalidInput:
            return False
        return self._marker(repo_id).is_file()

    def create_repo(self, caller: Caller, body: dict[str, Any], base: str) -> Response:
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"lorahub serve holds model repos only, not {repo_type!r} repos")
        name = body.get("name")
        ns = body.get("organization") or caller.name or self.read.mapping.namespace
        if not isinstance(name, str) or not isinstance(ns, str):
            raise HubError(400, "create_repo needs a name (and an organization or a token)")
        self.auth.may_write(caller, ns)
        repo_id, _, _ = self._target(ns, name)
        url = f"{base}/{repo_id}"
        with self._locked(repo_id):
            _, _, infos = self._target(ns, name)
            if infos or self._marker(repo_id).is_file():
                answer = {"error": "You already created this model repo", "url": url}
                return JSONResponse(answer, 409)
            marker = self._marker(repo_id)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        log.info("created empty repo %s", repo_id)
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    def _head(self, lname: str, tag: str) -> AdapterInfo | None:
        try:
            return self.hub.get(f"{lname}:{tag}")
        except AmbiguousReference as exc:
            raise HubError(
                409, f"{lname}:{tag} is ambiguous, so it cannot be updated: {exc}"
            ) from None
        except AdapterNotFound:
            return None

    def _tag(self, revision: str) -> str:
        try:
            tag = self.read.mapping.tag(revision)
        except InvalidInput as exc:
            raise HubError(400, str(exc)) from None
        if tag is None:
            raise HubError(400, f"cannot write to commit {revision}: name a branch or tag")
        return tag

    # ------------------------------------------------------------------ preupload, LFS

    def preupload(
        self, caller: Caller, ns: str, name: str, revision: str, body: dict[str, Any]
    ) -> Response:
        self.auth.may_write(caller, ns)
        repo_id, lname, _ = self._target(ns, name)
        head = self._head(lname, self._tag(revision))
        served = self.read.files.files(head, repo_id) if head else {}
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload needs a list of files")
        out = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise HubError(400, "each preupload file needs a path")
            if _utf8(f["path"]) is None:
                raise HubError(400, f"invalid path {f['path']!r}")
            path, size, text = f["path"], f.get("size"), f.get("sample")
            if text is not None and not isinstance(text, str):
                raise HubError(400, f"the sample of {path!r} is not a base64 string")
            try:
                sample = base64.b64decode(text or "", validate=True)
            except ValueError:
                raise HubError(400, f"invalid base64 sample for {path!r}") from None
            lfs = (isinstance(size, int) and size >= LFS_THRESHOLD) or b"\0" in sample
            lfs = (lfs or path.lower().endswith(LFS_SUFFIXES)) and size != 0
            entry: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            there = served.get(path)
            if there is not None and there.is_lfs == lfs:
                entry["oid"] = there.sha256 if lfs else there.etag
            out.append(entry)
        return JSONResponse({"files": out})

    def _known(
        self, repo_id: str, oid: str, size: int | None, infos: list[AdapterInfo]
    ) -> Path | None:
        """Where the object ``oid`` is: staged for ``repo_id`` (then touched, so it is kept
        for the commit that names it), or the weights of one of the repo's adapters
        ``infos`` (what another push to the repo staged, then stored and discarded)."""
        staged = self.uploads.staged(repo_id, oid)
        if staged is not None:
            with contextlib.suppress(FileNotFoundError):
                if size is None or staged.stat().st_size == size:
                    self.uploads.touch(staged)
                    return staged
        seen: set[str] = set()
        for info in infos:
            if info.weights_digest in seen or (size is not None and size != info.size):
                continue
            seen.add(info.weights_digest)
            if self.read.files.sha256(info) == oid:  # hashed once per blob, then kept
                return Path(self.hub.blobs.local_path(_digest(info.weights_digest)))
        return None

    def batch(
        self, caller: Caller, ns: str, name: str, body: dict[str, Any], base: str
    ) -> Response:
        self.auth.may_write(caller, ns)
        if body.get("operation") != "upload":
            raise HubError(400, "this LFS endpoint takes uploads; downloads go through /resolve")
        repo_id, lname, infos = self._target(ns, name)
        ref = body.get("ref")
        revision = str((ref.get("name") if isinstance(ref, dict) else None) or MAIN).removeprefix(
            "refs/heads/"
        )
        self._head(lname, self._tag(revision))  # a bad or ambiguous revision: refused now
        self.uploads.collect_now_and_then()  # abandoned pushes, without a restart
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "the LFS batch request needs a list of objects")
        out: list[dict[str, Any]] = []
        for obj in objects:
            oid = check_oid(obj.get("oid") if isinstance(obj, dict) else None)
            size = obj.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise HubError(400, f"invalid size {size!r} for LFS object {oid}")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if size > self.uploads.max_size:
                answer["error"] = {"code": 413, "message": self.uploads._too_large(size)}
            elif self._known(repo_id, oid, size, infos) is None:
                answer["actions"] = {
                    "upload": {
                        "href": base + self.uploads.upload_path(repo_id, oid, size),
                        "header": {},
                    },
                    "verify": {"href": f"{base}/lorahub-lfs/verify/{repo_id}", "header": {}},
                }
            out.append(answer)
        return JSONResponse({"transfer": "basic", "objects": out}, media_type=LFS_JSON)

    async def put_object(
        self, request: Request, ns: str, name: str, oid: str, size: str
    ) -> Response:
        """The LFS PUT: authorised by its signed URL, streamed to the staging area."""
        check_oid(oid)
        count = parse_size(size)
        if count is None:
            raise HubError(400, f"invalid size {size[:40]!r}")
        q = request.query_params
        repo_id = f"{ns}/{name}"  # checked by the batch route that signed the URL
        self.uploads.check_url(repo_id, oid, count, q.get("expires", ""), q.get("sig", ""))
        declared = parse_size(request.headers.get("content-length"))
        try:
            await self.uploads.receive(request.stream(), repo_id, oid, count, declared)
        except ClientDisconnect:
            log.info("upload of %s to %s/%s dropped by the client", oid, ns, name)
            return Response(status_code=400)  # nobody is listening; the partial file is gone
        return Response(status_code=200)

    def verify(self, caller: Caller, ns: str, name: str, body: dict[str, Any]) -> Response:
        self.auth.may_write(caller, ns)
        repo_id, _, _ = self._target(ns, name)
        oid = check_oid(body.get("oid"))
        size = body.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise HubError(400, f"invalid size {size!r}: a whole number of bytes")
        staged = self.uploads.staged(repo_id, oid)
        try:
            missing = staged is None or (isinstance(size, int) and staged.stat().st_size != size)
        except FileNotFoundError:
            missing = True
        if missing:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return JSONResponse({"oid": oid, "size": size}, media_type=LFS_JSON)

    # ------------------------------------------------------------------ commit

    def commit(
        self, caller: Caller, ns: str, name: str, revision: str, commit: _Commit, base: str
    ) -> Response:
        self.auth.may_write(caller, ns)
        tag = self._tag(revision)
        repo_id, _, _ = self._target(ns, name)
        with self._locked(repo_id):  # the parent's check and the import: one step
            repo_id, lname, infos = self._target(ns, name)
            head = self._head(lname, tag)
            current = commit_id(head.digest) if head else empty_commit(repo_id)
            parent = commit.header.get("parentCommit")
            if parent and parent != current:
                raise HubError(
                    412,
                    f"{repo_id}@{revision} has moved on since {parent}: it is now at {current}",
                )
            files: dict[str, _File] = {}
            for path, (oid, size) in commit.lfs.items():
                found = self._known(repo_id, oid, size, infos)
                if found is None:
                    raise HubError(
                        422,
                        f"{path}: LFS object {oid} was never uploaded to this server (or was "
                        "collected since): upload it through the LFS batch API first",
                    )
                files[path] = _File(path=found)
            files |= {path: _File(data=data) for path, data in commit.adds.items()}
            folder = self._folder(head, repo_id, revision, files, commit)
            info = self._import(folder, f"{lname}:{tag}", f"{repo_id}@{revision}")
            self._discard_stored(repo_id, info, [oid for oid, _ in commit.lfs.values()])
        oid = commit_id(info.digest)
        log.info("commit to %s@%s: %s is %s", repo_id, revision, f"{lname}:{tag}", info.digest)
        return JSONResponse(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{base}/{repo_id}/commit/{oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _folder(
        self,
        head: AdapterInfo | None,
        repo_id: str,
        revision: str,
        files: dict[str, _File],
        commit: _Commit,
    ) -> dict[str, _File]:
        """The PEFT folder the commit makes: the parent's files (unless the commit holds a
        config and weights of its own), less its deletions, plus its ``files``."""
        complete = peft.CONFIG in files and any(w in files for w in _WEIGHTS)
        folder: dict[str, _File] = {}
        if head is not None and not complete:
            folder = {n: _served(f) for n, f in self.read.files.files(head, repo_id).items()}
        for path in commit.deletes:
            if path not in folder:
                raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
            del folder[path]
        for prefix in commit.folders:
            folder = {n: f for n, f in folder.items() if not n.startswith(prefix.rstrip("/") + "/")}
        changed = peft.CONFIG in files or any(w in files for w in _WEIGHTS)
        if changed and lorahub_json.FILENAME not in files:
            folder.pop(lorahub_json.FILENAME, None)  # it described the parent's adapter
        return folder | files

    def _discard_stored(self, repo_id: str, info: AdapterInfo, oids: list[str]) -> None:
        """Remove the staged objects the commit stored as ``info``'s weights: a later
        commit to the repo that names one finds it there (:meth:`_known`). Any other
        staged object stays until it is collected: another push may still name it."""
        staged = [oid for oid in oids if self.uploads.staged(repo_id, oid) is not None]
        if staged and (weights := self.read.files.sha256(info)) in staged:
            self.uploads.discard(repo_id, weights)

    def _import(self, folder: dict[str, _File], reference: str, where: str) -> AdapterInfo:
        """Store the assembled folder under ``reference``: all of it, or nothing."""
        tmp = Path(self.hub.home) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        work = tmp / f"serve-commit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            try:
                for name, f in folder.items():
                    dest = work / name
                    if f.data is not None:
                        dest.write_bytes(f.data)
                    else:
                        assert f.path is not None
                        try:
                            os.link(f.path, dest)  # same filesystem: no copy of the weights
                        except OSError:
                            shutil.copyfile(f.path, dest)
            except OSError as exc:  # the files never reached the store: nothing to undo
                raise disk_failure(exc, where) from None
            try:
                added = self.hub.add(work, name=reference).adapter
            except (InvalidInput, CorruptData) as exc:
                # The message names files by the work folder's path: the client's names
                # are enough, and the server's paths are not the client's business.
                reason = str(exc).replace(f"{work}{os.sep}", "").replace(str(work), "the commit")
                raise HubError(
                    422, f"{where}: not stored, the commit does not make a LoRA adapter: {reason}"
                ) from None
            assert added is not None  # add raises rather than refuse
            return added
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ tags, branches

    def _existing(self, caller: Caller, ns: str, name: str) -> tuple[str, str, list[AdapterInfo]]:
        self.auth.may_write(caller, ns)
        repo_id, lname, infos = self._target(ns, name)
        if not infos and not self._marker(repo_id).is_file():
            raise repo_not_found(caller.authenticated)
        return repo_id, lname, infos

    def _new_ref(self, lname: str, infos: list[AdapterInfo], start: str, new: str) -> Response:
        if not isinstance(new, str):
            raise HubError(400, f"invalid tag {new!r}: a string")
        if new == MAIN:
            raise HubError(409, f"{new!r} already exists")
        _check_tag(new)
        if self._head(lname, new) is not None:
            raise HubError(409, f"{new!r} already exists in {lname}")
        info = self.read.revision(lname, infos, start)
        self.hub.tag(info.digest, f"{lname}:{new}")
        return JSONResponse({"name": new})

    def create_tag(
        self, caller: Caller, ns: str, name: str, revision: str, body: dict[str, Any]
    ) -> Response:
        repo_id, _, _ = self._existing(caller, ns, name)
        with self._locked(repo_id):  # the "already exists" check and the tag: one step
            _, lname, infos = self._existing(caller, ns, name)
            if not infos:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return self._new_ref(lname, infos, revision, body.get("tag"))  # type: ignore[arg-type]

    def create_branch(
        self, caller: Caller, ns: str, name: str, branch: str, body: dict[str, Any]
    ) -> Response:
        repo_id, _, _ = self._existing(caller, ns, name)
        with self._locked(repo_id):
            _, lname, infos = self._existing(caller, ns, name)
            if not infos:  # every branch of an empty repo is empty: its first commit makes it
                if branch != MAIN:
                    _check_tag(branch)
                return JSONResponse({"name": branch})
            start = body.get("startingPoint") or MAIN
            return self._new_ref(lname, infos, str(start), branch)

    # ------------------------------------------------------------------ empty repos

    def not_found(self, request: Request, exc: HubError, s: list[str]) -> Response | None:
        """The answer of a read that found no adapter (``exc``), when its repo was created
        empty here and the caller may read it; None to keep ``exc``."""
        if exc.code != "RepoNotFound":
            return None
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            ns, name, rest = s[2], s[3], s[4:]
        elif len(s) >= 5 and s[2] == "resolve":
            ns, name, rest = s[0], s[1], s[2:]
        else:
            return None
        caller = self.auth.caller(request)
        try:
            self.auth.may_read(caller, ns)
        except HubError:
            return None
        return self.empty_answer(ns, name, rest)

    def empty_answer(self, ns: str, name: str, rest: list[str]) -> Response | None:
        """What a created repo without an adapter answers to a read (``rest``: the API path
        after the repo id, or ``["resolve", rev, *path]``); None when the repo is not one."""
        if not self.is_empty_repo(ns, name):
            return None
        repo_id = f"{ns}/{name}"
        sha = empty_commit(repo_id)
        revision = (
            rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree", "resolve") else MAIN
        )
        try:
            if revision != sha:
                self.read.mapping.tag(revision)
        except InvalidInput:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound") from None
        if not rest or rest[0] == "revision":
            return JSONResponse(
                {
                    "_id": sha[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": ns,
                    "sha": sha,
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [],
                    "library_name": "peft",
                }
            )
        if rest[0] == "tree":
            if len(rest) > 2 and rest[2]:
                raise HubError(404, f"{rest[2]} does not exist", "EntryNotFound", sha)
            return JSONResponse([])
        if rest == ["refs"]:
            main = {"name": MAIN, "ref": "refs/heads/main", "targetCommit": sha}
            return JSONResponse(
                {"branches": [main], "converts": [], "tags": [], "pullRequests": []}
            )
        if rest[0] == "resolve":
            path = "/".join(rest[2:])
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", sha)
        return None


def _served(f: RepoFile) -> _File:
    return _File(data=f.data) if f.data is not None else _File(path=f.path)


def _digest(text: str) -> Any:
    from ..digest import Digest

    return Digest.parse(text)


def _check_path(path: object) -> str:
    """A file path of the commit: relative, at the repo's root, nothing odd in it, a name
    the file system takes (at most 255 bytes of UTF-8: no lone surrogate)."""
    encoded = _utf8(path) if isinstance(path, str) else None
    if not isinstance(path, str) or not encoded or len(encoded) > 255:
        raise HubError(400, f"invalid path in the commit: {path!r}")
    if "\0" in path or "\\" in path or path.startswith("/") or path in (".", ".."):
        raise HubError(400, f"invalid path in the commit: {path!r}")
    if "/" in path:
        raise HubError(
            422,
            f"{path}: lorahub serve keeps one adapter folder per repo, at its root; "
            "upload the adapter's files without a folder (no path_in_repo)",
        )
    return path


def _write_route(method: str, s: list[str]) -> tuple[str, str | None] | None:
    """``(kind, namespace written to)`` of a write route, known from the path alone (the
    namespace is None where the body names it, or nothing is written); None: no route."""
    if method != "POST":
        return None
    if s == ["api", "validate-yaml"]:
        return "validate-yaml", None
    if s == ["api", "repos", "create"]:
        return "create", None
    if len(s) == 4 and s[:2] == ["lorahub-lfs", "verify"]:
        return "verify", s[2]
    if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
        return "batch", s[0]
    if len(s) == 6 and s[:2] == ["api", "models"] and s[4] in _MODEL_ROUTES:
        return s[4], s[2]
    return None


_MODEL_ROUTES = ("commit", "preupload", "tag", "branch")


@dataclass
class _Commit:
    """The NDJSON commit: header, regular files, LFS files (oid, size), deleted files and
    folders; fed its body chunk by chunk, each line parsed as soon as it is complete."""

    header: dict[str, Any] = field(default_factory=dict)
    adds: dict[str, bytes] = field(default_factory=dict)
    lfs: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    has_header: bool = False
    _pending: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._pending.append(chunk[start:end])
            line, self._pending = b"".join(self._pending), []
            self._line(line)
            start = end + 1
        if start < len(chunk):
            self._pending.append(chunk[start:])

    def finish(self) -> _Commit:
        if self._pending:
            line, self._pending = b"".join(self._pending), []
            self._line(line)
        if not self.has_header:
            raise HubError(400, "the commit has no header line")
        for path in self.adds:
            if path in self.lfs:
                raise HubError(400, f"{path} appears twice in the commit")
        return self

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        if len(self.adds) + len(self.lfs) + len(self.deletes) >= COMMIT_FILES:
            # An adapter folder holds a handful: thousands of tiny files would only cost
            # the disk a file each before the import refuses them.
            raise HubError(400, f"a commit holds at most {COMMIT_FILES} files")
        item = _json(line)
        key, value = item.get("key"), item.get("value")
        if not isinstance(value, dict):
            raise HubError(400, f"commit line {key!r} has no value object")
        if key == "header":
            self.header, self.has_header = value, True
        elif key == "file":
            path = _check_path(value.get("path"))
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
            content = value.get("content")
            if content is not None and not isinstance(content, str):
                raise HubError(400, f"{path}: the content is not a base64 string")
            try:
                self.adds[path] = base64.b64decode(content or "", validate=True)
            except ValueError:
                raise HubError(400, f"{path}: invalid base64 content") from None
        elif key == "lfsFile":
            path = _check_path(value.get("path"))
            if value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"{path}: unsupported hash {value.get('algo')!r}")
            size = value.get("size")
            known = size if isinstance(size, int) and not isinstance(size, bool) else None
            self.lfs[path] = (check_oid(value.get("oid")), known)
        elif key == "deletedFile":
            self.deletes.append(_check_path(value.get("path")))
        elif key == "deletedFolder":
            folder = value.get("path")
            if not isinstance(folder, str) or "\0" in folder or ".." in folder.split("/"):
                raise HubError(400, f"invalid folder in the commit: {folder!r}")
            self.folders.append(folder)
        else:
            raise HubError(400, f"unknown commit line {key!r}")


def _check_tag(tag: str) -> None:
    """A tag or branch name lorahub takes (``refs.validate_tag``), else a 400."""
    try:
        validate_tag(tag)
    except InvalidInput as exc:
        raise HubError(400, str(exc)) from None


def _utf8(text: str) -> bytes | None:
    """``text`` in UTF-8; None when it holds a lone surrogate (JSON's ``"\\ud800"``)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise HubError(400, "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise HubError(400, "the request body is not a JSON object")
    return value


async def _read_commit(request: Request, cap: int) -> _Commit:
    """The NDJSON commit, parsed as it streams in, refused (413) past ``cap`` bytes."""
    commit = _Commit()
    async for chunk in chunks(request, cap):
        commit.feed(chunk)
    return commit.finish()
