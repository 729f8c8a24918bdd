"""Push and pull adapters through the Hugging Face Hub; ``huggingface_hub`` does every request.

A pushed repo is a plain PEFT adapter folder, so PEFT and the Hub read it as they read any
other: ``adapter_config.json``, ``adapter_model.safetensors``, a ``README.md`` model card, plus
``lorahub.json`` (the manifest and its digest) so another lorahub can check that what it pulled
is exactly what was pushed. Every file is a pure function of the adapter, so a second push of
the same adapter uploads nothing and makes no commit (the client skips files whose remote oid
matches).

Pull takes any PEFT adapter repo, at a branch, tag or commit, in a subfolder or not, and fetches
only the adapter files through the shared Hugging Face cache, so a repo already there (from an
earlier pull, ``hf download`` or ``PeftModel.from_pretrained``) costs no download.

Hub settings stay huggingface_hub's: the endpoint is read from ``constants.ENDPOINT`` on each
call (``HF_ENDPOINT``), the token is resolved by the client (``HF_TOKEN``, ``hf auth login``)
and never passes through lorahub's hands, and ``HF_HUB_OFFLINE`` switches pulls to the cache.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from . import manifest as mf
from .card import adapter_card
from .digest import hash_file
from .errors import (
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    LorahubError,
    RemoteError,
)
from .formats import lorahub_json, peft
from .manifest import BaseRef, lorahub_json_text
from .refs import DEFAULT_TAG, validate_name, validate_tag

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    from .adapter import LoraAdapter
    from .info import AdapterInfo

log = logging.getLogger(__name__)

README = "README.md"
LORAHUB_JSON = lorahub_json.FILENAME
DEFAULT_REVISION = "main"
#: Weights at least this large get their safetensors header checked (one small range request)
#: before the download, so a lying or non-LoRA file is refused before its bytes are fetched.
HEADER_CHECK_MIN_BYTES = 8 << 20

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


# ---------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class PushResult:
    """What a push did: the commit the branch now points at and what crossed the wire.

    ``committed`` is False when the repo already held these exact files (no commit was made);
    ``bytes_uploaded`` counts the files that changed (0 when nothing did).
    """

    repo_id: str
    revision: str
    commit: str
    commit_url: str
    url: str
    committed: bool
    bytes_uploaded: int
    files_uploaded: tuple[str, ...]
    tag: str | None = None
    path_in_repo: str | None = None
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files_uploaded"] = list(self.files_uploaded)
        return d


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter's files from a Hub repo, in the Hugging Face cache, ready to import.

    ``revision`` is what was asked (a branch, tag or commit), ``commit`` what it resolved to.
    """

    endpoint: str
    repo_id: str
    revision: str
    commit: str
    subfolder: str | None
    folder: Path
    weights: Path
    lorahub_json: Path | None
    offline: bool = False

    @property
    def label(self) -> str:
        """``repo@revision[/subfolder]`` for messages."""
        sub = f" (subfolder {self.subfolder})" if self.subfolder else ""
        return f"{self.repo_id}@{self.revision}{sub}"

    @property
    def format(self) -> str:
        return "peft-safetensors" if self.weights.name == peft.SAFETENSORS else "peft-bin"

    def origin(self) -> dict[str, Any]:
        """The catalog's record of where the adapter came from (no credentials, ever)."""
        origin: dict[str, Any] = {
            "endpoint": self.endpoint,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "format": self.format,
        }
        if self.subfolder:
            origin["subfolder"] = self.subfolder
        return origin


# ---------------------------------------------------------------------- names and paths


def endpoint() -> str:
    """The Hub endpoint huggingface_hub uses now (``HF_ENDPOINT``), read at call time."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _public_url(url: str) -> str:
    """A URL without any ``user:password@`` part, safe to store and print."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def split_repo_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"org/name@v1"`` -> ``("org/name", "v1")``; a ``revision`` given apart must agree."""
    repo_id, sep, rev = spec.strip().partition("@")
    if sep and not rev:
        raise InvalidReference(f"{spec!r} ends with '@': give a revision after it, or drop it")
    if sep and revision is not None and revision != rev:
        raise InvalidReference(
            f"{spec!r} names revision {rev!r} but --revision says {revision!r}; give one"
        )
    return repo_id, (rev if sep else revision)


def check_repo_id(repo_id: str) -> str:
    """A repo id the Hub accepts (``name`` or ``namespace/name``), else ``InvalidReference``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidReference(
            f"{repo_id!r} is not a Hub repo id: use 'namespace/name' "
            f"(letters, digits, '-', '_', '.'); {str(exc).splitlines()[0]}"
        ) from None
    return repo_id


def is_safe_repo_path(path: str) -> bool:
    """A relative POSIX path with no ``..``, ``.``, empty part, backslash or drive."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        return False
    parts = path.split("/")
    if re.match(r"^[A-Za-z]:", parts[0]):
        return False
    return all(p not in ("", ".", "..") for p in parts)


def clean_subpath(value: str | None, what: str) -> str | None:
    """A subfolder / path in repo, without surrounding slashes; refuses escapes."""
    if value is None:
        return None
    text = value.strip().strip("/")
    if not text:
        return None
    if not is_safe_repo_path(text):
        raise InvalidReference(
            f"{what} {value!r} is not a plain relative folder: no '..', '.', backslashes, "
            "empty parts or absolute paths"
        )
    return text


def default_name(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    """The reference a pulled adapter gets without ``--name``: ``org/repo[-sub]:<tag>``.

    The tag is the revision asked when it is a valid tag (not a commit sha), else ``latest``,
    like ``docker pull org/repo:v1``.
    """
    namespace, _, name = repo_id.rpartition("/")
    if subfolder:
        name = f"{name}-{subfolder.replace('/', '-')}"
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-._")[:128] for p in (namespace, name)]
    text = "/".join(p for p in parts if p)
    try:
        validate_name(text)
    except InvalidReference:
        text = "pulled"
    tag = DEFAULT_TAG
    if revision and not _COMMIT.match(revision):
        with contextlib.suppress(InvalidReference):
            tag = validate_tag(revision)
    return f"{text}:{tag}"


# ---------------------------------------------------------------------- errors


def _token_sent(writing: bool) -> bool:
    """Whether the client sent a token (never its value: only whether there is one)."""
    from huggingface_hub import constants, get_token

    if writing:
        return True
    if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN:
        return False
    try:
        return get_token() is not None
    except Exception:  # token resolution is best effort here: this only shapes a message
        return False


def _scrub(text: str) -> str:
    """Remove the token from a message, should any layer below have echoed it."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:
        token = None
    if token and token in text:
        text = text.replace(token, "<token>")
    return text


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_says(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or str(exc)
    return " ".join(str(msg).split())[:300]


def _is_transport_error(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx2", "httpx", "httpcore2", "httpcore", "requests", "urllib3") or (
        isinstance(exc, (ConnectionError, TimeoutError))
    )


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, *, writing: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into lorahub errors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as e

    ep = _public_url(endpoint())
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        yield
    except LorahubError:
        raise
    except e.LocalTokenNotFoundError:
        if constants.HF_HUB_OFFLINE:  # the token is asked for first, but offline is the cause
            raise RemoteError(
                f"HF_HUB_OFFLINE is set, so {ep} cannot be reached for {repo_id}: unset it to push"
            ) from None
        raise RemoteError(
            f"pushing to {repo_id} needs a Hugging Face token with write access: {login}"
        ) from None
    except e.OfflineModeIsEnabled:
        raise RemoteError(
            f"HF_HUB_OFFLINE is set, so {ep} cannot be reached for {repo_id}: unset it to "
            + ("push" if writing else "download")
        ) from None
    except e.GatedRepoError as exc:
        how = (
            "the token sent has not been granted access"
            if _token_sent(writing)
            else "no token was sent"
        )
        raise RemoteError(
            f"{repo_id} is gated and {how}: request access at {ep}/{repo_id} with your account, "
            f"then {login}"
        ) from exc
    except e.RepositoryNotFoundError as exc:
        if _token_sent(writing):
            hint = "or it is private and your token cannot see it: check the name and your access"
        else:
            hint = f"or it is private and no token was sent: check the name, or {login}"
        raise RemoteError(f"{repo_id} was not found on {ep}, {hint}") from exc
    except e.RevisionNotFoundError as exc:
        raise RemoteError(
            f"{repo_id} has no revision {revision!r}: give an existing branch, tag or commit "
            f"(see {ep}/{repo_id}/tree/main)"
        ) from exc
    except e.LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise RemoteError(
                f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}): pull it once online, or unset HF_HUB_OFFLINE"
            ) from exc
        raise RemoteError(
            f"cannot reach {ep} for {repo_id}@{revision} and it is not in the Hugging Face "
            "cache: check your connection and HF_ENDPOINT, then try again"
        ) from exc
    except e.EntryNotFoundError as exc:
        raise RemoteError(
            f"a file is missing from {repo_id} at {revision}: {_scrub(_server_says(exc))}"
        ) from exc
    except e.SafetensorsParsingError as exc:
        raise InvalidAdapter(
            f"{repo_id}@{revision}: the safetensors header cannot be read "
            f"({_scrub(str(exc)).splitlines()[0]}); the file is corrupt or not safetensors"
        ) from None
    except e.HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, revision, writing, ep, login) from exc
    except e.HFValidationError as exc:
        raise InvalidReference(_scrub(str(exc).splitlines()[0])) from None
    except ValueError as exc:
        if "Invalid filename" in str(exc):
            raise RemoteError(
                f"refusing to download from {repo_id}: {ep} lists a file name that escapes the "
                "repository; nothing was stored"
            ) from exc
        raise
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            raise IntegrityError(
                f"a download from {repo_id}@{revision} was cut short or altered in transit (its "
                "size does not match what the Hub announced); nothing was stored: pull again"
            ) from None
        if _is_transport_error(exc):
            raise _unreachable(exc, repo_id, ep) from exc
        raise
    except Exception as exc:
        if _is_transport_error(exc):
            raise _unreachable(exc, repo_id, ep) from exc
        raise


def _unreachable(exc: BaseException, repo_id: str, ep: str) -> RemoteError:
    return RemoteError(
        f"cannot reach {ep} for {repo_id} ({type(exc).__name__}: {_scrub(str(exc))[:200]}): "
        "check your connection and HF_ENDPOINT; with HF_HUB_OFFLINE=1, pull uses the cache"
    )


def _http_error(
    exc: BaseException, repo_id: str, revision: str, writing: bool, ep: str, login: str
) -> RemoteError:
    status = _status(exc)
    said = _scrub(_server_says(exc))
    if status == 401:
        if writing or _token_sent(writing):
            return RemoteError(
                f"{ep} refused the credentials for {repo_id} ({said}): the token is unknown or "
                f"expired; {login}"
            )
        return RemoteError(f"{repo_id} needs authentication ({said}): {login}")
    if status == 403:
        if writing:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
            return RemoteError(
                f"your token cannot write to {repo_id} ({said}): use a token with write access "
                f"to {namespace!r}, then {login}"
            )
        return RemoteError(f"access to {repo_id} was refused ({said}): check your access")
    if status == 412 and writing:
        return RemoteError(
            f"{repo_id}@{revision} changed while pushing (someone else committed): push again"
        )
    if status == 400 and writing:
        hint = "; --revision must name a branch (tags are set with --tag)"
        return RemoteError(
            f"the Hub refused the push to {repo_id}@{revision} ({said})"
            + (hint if "branch" in said.lower() else "")
        )
    return RemoteError(f"the Hub answered {status} for {repo_id}@{revision}: {said}")


# ---------------------------------------------------------------------- push


def check_weights(info: AdapterInfo, weights: Path) -> None:
    """Refuse to publish a blob that no longer matches its digest."""
    try:
        got, size = hash_file(weights)
    except FileNotFoundError:
        raise IntegrityError(
            f"the weights blob of {info.digest} is missing; run `lorahub verify`"
        ) from None
    if str(got) != info.weights_digest or size != info.size:
        raise IntegrityError(
            f"the weights blob of {info.digest} is corrupt (hashes to {got}, expected "
            f"{info.weights_digest}); nothing was pushed. Run `lorahub verify` and re-add it"
        )


def write_push_files(info: AdapterInfo, weights: Path, out: Path, *, title: str) -> dict[str, Path]:
    """The files a push uploads, by name in the repo: small ones written to ``out``, the
    weights read straight from the blob (no copy). Nothing depends on time or local names."""
    peft.write_config(info.config, out)
    (out / README).write_text(adapter_card(info, title=title), encoding="utf-8")
    (out / LORAHUB_JSON).write_text(lorahub_json_text(info.digest, info.manifest), "utf-8")
    return {
        peft.CONFIG: out / peft.CONFIG,
        peft.SAFETENSORS: weights,
        README: out / README,
        LORAHUB_JSON: out / LORAHUB_JSON,
    }


def push_adapter(
    info: AdapterInfo,
    weights: Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    tag: str | None = None,
    path_in_repo: str | None = None,
) -> PushResult:
    """Push a stored adapter (its manifest info and weights blob) to ``repo_id``."""
    check_repo_id(repo_id)
    check_weights(info, weights)
    with tempfile.TemporaryDirectory(prefix="lorahub-push-") as tmp:
        files = write_push_files(info, weights, Path(tmp), title=repo_id)
        result = push_files(
            repo_id,
            files,
            private=private,
            revision=revision,
            tag=tag,
            path_in_repo=path_in_repo,
            commit_message=f"Upload LoRA adapter {info.short} with lorahub",
        )
    return replace(result, digest=info.digest)


def push_files(
    repo_id: str,
    files: Mapping[str, Path],
    *,
    private: bool | None = None,
    revision: str | None = None,
    tag: str | None = None,
    path_in_repo: str | None = None,
    commit_message: str = "Upload with lorahub",
) -> PushResult:
    """Commit ``files`` (name in repo -> local path) to a branch, creating repo and branch if
    needed; unchanged files are not uploaded and an unchanged repo gets no commit.

    Raises:
        RemoteError: no token, no write access, a tag that exists elsewhere, a failed request.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    prefix = clean_subpath(path_in_repo, "path in repo")
    branch = revision or DEFAULT_REVISION
    if _COMMIT.match(branch):
        raise InvalidReference(f"cannot push to commit {branch}: --revision must name a branch")
    ep = endpoint()
    # token=True: pushing always needs the user's token, resolved by huggingface_hub itself.
    api = HfApi(endpoint=ep, token=True)
    with _hub_errors(repo_id, branch, writing=True):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = getattr(repo_url, "repo_id", None) or repo_id
        before = _branch_info(api, full_id, branch)
        if private and not before.private:
            raise RemoteError(
                f"{full_id} already exists and is public; --private only applies when the repo "
                "is created. Make it private in its settings on the Hub, or push without --private"
            )
        remote = {s.rfilename: s for s in (before.siblings or [])}
        operations = []
        changed: list[str] = []
        size = 0
        for name, local in files.items():
            target = f"{prefix}/{name}" if prefix else name
            op = CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(local))
            operations.append(op)
            if not _unchanged(remote.get(target), op, Path(local)):
                changed.append(target)
                size += op.upload_info.size
        if tag:
            _check_tag_free(api, full_id, tag, before.sha if not changed else None)
        commit = api.create_commit(
            full_id,
            operations=operations,
            commit_message=commit_message,
            revision=branch,
            parent_commit=before.sha,
        )
        sha = str(commit.oid)
        committed = sha != before.sha
        if tag:
            _ensure_tag(api, full_id, tag, sha)
    log.info("pushed to %s@%s: %s", full_id, branch, f"commit {sha}" if committed else "no change")
    tree = "" if branch == DEFAULT_REVISION and not prefix else f"/tree/{quote(branch, safe='')}"
    url = f"{_public_url(ep)}/{full_id}{tree}" + (f"/{prefix}" if prefix else "")
    return PushResult(
        repo_id=full_id,
        revision=branch,
        commit=sha,
        commit_url=_public_url(str(commit.commit_url)),
        url=url,
        committed=committed,
        bytes_uploaded=size if committed else 0,
        files_uploaded=tuple(changed) if committed else (),
        tag=tag,
        path_in_repo=prefix,
    )


def _branch_info(api: HfApi, repo_id: str, branch: str) -> Any:
    """The branch's head with file metadata; a missing branch other than main is created."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.model_info(repo_id, revision=branch, files_metadata=True)
    except RevisionNotFoundError:
        if branch == DEFAULT_REVISION:
            raise
    api.create_branch(repo_id, branch=branch, exist_ok=True)
    log.info("created branch %s in %s", branch, repo_id)
    return api.model_info(repo_id, revision=branch, files_metadata=True)


def _git_blob_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _unchanged(sibling: RepoSibling | None, op: Any, local: Path) -> bool:
    """Whether the repo already holds this exact file (same test the client makes)."""
    if sibling is None:
        return False
    if sibling.size is not None and sibling.size != op.upload_info.size:
        return False
    if sibling.lfs is not None:
        return bool(sibling.lfs.sha256 == op.upload_info.sha256.hex())
    return sibling.blob_id is not None and sibling.blob_id == _git_blob_oid(local)


def _tag_target(api: HfApi, repo_id: str, tag: str) -> str | None:
    """The commit ``tag`` points at in ``repo_id``, or None when there is no such tag."""
    return next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)


def _check_tag_free(api: HfApi, repo_id: str, tag: str, head: str | None) -> None:
    """Refuse, before committing anything, a tag that exists at another commit than the one
    the push will leave (``head``: the branch head when nothing changes; None when a new
    commit is coming, which no existing tag can point at)."""
    current = _tag_target(api, repo_id, tag)
    if current is not None and current != head:
        raise RemoteError(
            f"tag {tag!r} already exists in {repo_id} at commit {current[:12]}; nothing was "
            f"pushed: choose another tag, or delete it first (`hf repos tag delete {repo_id} "
            f"{tag}`)"
        )


def _ensure_tag(api: HfApi, repo_id: str, tag: str, sha: str) -> None:
    """Tag ``sha``; an existing tag is fine only if it already points there."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=sha)
        return
    except HfHubHTTPError as exc:
        if _status(exc) != 409:
            raise
    current = _tag_target(api, repo_id, tag)
    if current != sha:
        where = f"commit {current[:12]}" if current else "another revision"
        raise RemoteError(
            f"tag {tag!r} already exists in {repo_id} at {where}, not at the pushed commit "
            f"{sha[:12]}: choose another tag, or delete it first "
            f"(`hf repos tag delete {repo_id} {tag}`)"
        )


# ---------------------------------------------------------------------- pull


def download_adapter(
    repo_id: str, *, revision: str | None = None, subfolder: str | None = None
) -> RemoteAdapter:
    """Fetch the adapter files of ``repo_id`` at ``revision`` into the Hugging Face cache.

    Only ``adapter_config.json``, the weights (safetensors, else ``.bin``) and ``lorahub.json``
    are downloaded, each checked against the size and hash the Hub lists. With
    ``HF_HUB_OFFLINE`` the cache alone is used.

    Raises:
        RemoteError: missing or private repo, missing revision, gated repo, hostile listing,
            unreachable Hub. InvalidAdapter: no adapter there. IntegrityError: corrupt download.
    """
    from huggingface_hub import constants

    check_repo_id(repo_id)
    sub = clean_subpath(subfolder, "subfolder")
    rev = revision or DEFAULT_REVISION
    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, rev, sub)
    return _download(repo_id, rev, sub)


def _in(sub: str | None, name: str) -> str:
    return f"{sub}/{name}" if sub else name


def _download(repo_id: str, rev: str, sub: str | None) -> RemoteAdapter:
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache

    ep = endpoint()
    api = HfApi(endpoint=ep)
    label = f"{repo_id}@{rev}"
    with _hub_errors(repo_id, rev, writing=False):
        info = api.model_info(repo_id, revision=rev, files_metadata=True)
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        _refuse_hostile(repo_id, ep, siblings)
        chosen = _choose(label, sub, siblings)
        weights = chosen[1]
        size = siblings[weights].size or 0
        cached = try_to_load_from_cache(repo_id, weights, revision=info.sha)
        big = weights.endswith(".safetensors") and size >= HEADER_CHECK_MIN_BYTES
        if big and not isinstance(cached, str):
            where = f"{label}: {weights}"
            try:
                meta = api.parse_safetensors_file_metadata(repo_id, weights, revision=info.sha)
                _check_header(meta, size, where)
            except LorahubError:
                raise
            except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
                # A hostile header of the wrong JSON types: a refusal, not a traceback.
                raise InvalidAdapter(
                    f"{where}: the safetensors header is malformed ({type(exc).__name__}: "
                    f"{_scrub(str(exc))[:200]}); refused before download"
                ) from None
        # The revision asked (not the sha) so the cache records refs/<revision> for offline use.
        folder = Path(
            snapshot_download(
                repo_id,
                revision=rev,
                allow_patterns=[glob.escape(p) for p in chosen],
                endpoint=ep,
            )
        )
    if folder.name != info.sha:
        raise RemoteError(
            f"{label} moved from {info.sha[:12]} to {folder.name[:12]} while pulling: pull again"
        )
    for path in chosen:
        _verify(folder / path, siblings[path], label)
    manifest = _in(sub, LORAHUB_JSON)
    if manifest not in chosen:
        _remember_absent(folder, manifest)
    return RemoteAdapter(
        endpoint=_public_url(ep),
        repo_id=repo_id,
        revision=rev,
        commit=str(info.sha),
        subfolder=sub,
        folder=folder / sub if sub else folder,
        weights=folder / weights,
        lorahub_json=folder / manifest if manifest in chosen else None,
    )


def _remember_absent(snapshot: Path, name: str) -> None:
    """Record in the cache, as huggingface_hub does after a 404, that this commit has no
    ``name``: an offline pull can then tell "absent" from "never asked for"."""
    marker = snapshot.parent.parent / ".no_exist" / snapshot.name / name
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _refuse_hostile(repo_id: str, ep: str, siblings: Mapping[str, Any]) -> None:
    bad = sorted(p for p in siblings if not is_safe_repo_path(p))
    if bad:
        shown = ", ".join(repr(p) for p in bad[:5])
        raise RemoteError(
            f"refusing to pull {repo_id}: {_public_url(ep)} lists file names that point outside "
            f"the repository ({shown}); a genuine Hub never does, so nothing was downloaded "
            "or stored"
        )


def _choose(label: str, sub: str | None, siblings: Mapping[str, Any]) -> list[str]:
    """config, weights (safetensors preferred) and lorahub.json when present."""
    config = _in(sub, peft.CONFIG)
    if config not in siblings:
        found = sorted(
            p[: -len(peft.CONFIG) - 1] for p in siblings if p.endswith("/" + peft.CONFIG)
        )
        msg = f"{label} has no {config}: it is not a PEFT adapter"
        if found:
            msg += f" there; adapters were found in {', '.join(found[:10])}: pass --subfolder"
        elif sub:
            msg += " folder; check --subfolder"
        raise InvalidAdapter(msg)
    for name in (peft.SAFETENSORS, peft.BIN):
        if _in(sub, name) in siblings:
            weights = _in(sub, name)
            break
    else:
        raise InvalidAdapter(
            f"{label} has {config} but neither {peft.SAFETENSORS} nor {peft.BIN} next to it: "
            "the adapter is incomplete"
        )
    chosen = [config, weights]
    if _in(sub, LORAHUB_JSON) in siblings:
        chosen.append(_in(sub, LORAHUB_JSON))
    return chosen


def _check_header(meta: Any, size: int, label: str) -> None:
    """Refuse a safetensors header that contradicts itself or the file size, or holds no LoRA."""
    spans = []
    for name, t in meta.tensors.items():
        begin, end = (int(x) for x in t.data_offsets)
        numel = 1
        for dim in t.shape:
            numel *= int(dim)
        width = _DTYPE_BYTES.get(str(t.dtype))
        if end < begin or (width is not None and end - begin != numel * width):
            raise InvalidAdapter(
                f"{label}: the safetensors header lies about tensor {name!r} ({t.dtype} "
                f"{list(t.shape)} cannot take bytes {begin}..{end}); refused before download"
            )
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise InvalidAdapter(f"{label}: the safetensors header has overlapping or gapped data")
        pos = end
    if pos + 8 + 2 > size:
        raise InvalidAdapter(
            f"{label}: the safetensors header describes {pos} bytes of data but the file has "
            f"{size} bytes; refused before download"
        )
    if not any("lora_" in k for k in meta.tensors):
        raise InvalidAdapter(f"{label}: the weights hold no LoRA tensors (no lora_A/lora_B keys)")


def _verify(path: Path, sibling: Any, label: str) -> None:
    """Check a downloaded file against the size and hash the Hub listed for it.

    The client checks sizes only; a same-size substitution is caught here, and the bad copy is
    dropped from the cache so the next pull downloads it again.
    """
    name = path.name
    if sibling.size is not None and path.stat().st_size != sibling.size:
        _drop(path)
        raise IntegrityError(
            f"{label}: {name} has {path.stat().st_size} bytes, the Hub lists {sibling.size}; "
            "the cached copy was removed, pull again"
        )
    if sibling.lfs is not None:
        expected, got = sibling.lfs.sha256, _sha256_file(path)
    elif sibling.blob_id:
        expected, got = sibling.blob_id, _git_blob_oid(path)
    else:
        return
    if expected != got:
        _drop(path)
        raise IntegrityError(
            f"{label}: the downloaded {name} does not match the hash the Hub lists "
            f"({expected[:16]}..., got {got[:16]}...): it was altered in transit or in the "
            "cache; the bad copy was removed, nothing was stored. Pull again"
        )


def _verify_cached(path: Path, label: str) -> None:
    """Offline, the cache blob's name is the etag the Hub gave: sha256 or git blob oid."""
    blob = Path(os.path.realpath(path)).name
    if _SHA256.match(blob):
        got = _sha256_file(path)
    elif _COMMIT.match(blob):
        got = _git_blob_oid(path)
    else:
        return
    if got != blob:
        _drop(path)
        raise IntegrityError(
            f"{label}: the cached {path.name} does not match its hash; the bad copy was removed. "
            "Pull again online"
        )


def _drop(path: Path) -> None:
    """Remove a corrupt file and its cache blob, only inside the Hugging Face cache."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE).resolve()
    real = Path(os.path.realpath(path))
    for p in {real, path}:
        try:
            if p.resolve().is_relative_to(cache) or p.is_relative_to(cache):
                p.unlink(missing_ok=True)
        except OSError as exc:  # a read-only cache: the message still says what happened
            log.warning("could not remove %s: %s", p, exc)


def _from_cache(repo_id: str, rev: str, sub: str | None) -> RemoteAdapter:
    """The offline pull: the cache only, never the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    label = f"{repo_id}@{rev}"

    def cached(name: str) -> Path | None:
        got = try_to_load_from_cache(repo_id, _in(sub, name), revision=rev)
        return Path(got) if isinstance(got, str) else None

    config = cached(peft.CONFIG)
    weights = cached(peft.SAFETENSORS) or cached(peft.BIN)
    if config is None or weights is None:
        raise RemoteError(
            f"HF_HUB_OFFLINE is set and {label} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): pull it once online, or unset HF_HUB_OFFLINE"
        )
    manifest = cached(LORAHUB_JSON)
    known = try_to_load_from_cache(repo_id, _in(sub, LORAHUB_JSON), revision=rev)
    if manifest is None and known is None:
        # Not "known absent" either: the cache was filled by something that never asked
        # for lorahub.json (PeftModel.from_pretrained), so its check cannot be made offline.
        log.warning(
            "offline: %s may carry a lorahub.json the cache does not hold; importing without "
            "its identity check (pull online once to have it checked)",
            label,
        )
    folder = config.parent
    snapshot = config.parents[len(sub.split("/")) if sub else 0]
    for path in (config, weights, manifest):
        if path is not None:
            _verify_cached(path, label)
    log.info("offline: using the cached %s (commit %s)", label, snapshot.name)
    return RemoteAdapter(
        endpoint=_public_url(endpoint()),
        repo_id=repo_id,
        revision=rev,
        commit=snapshot.name,
        subfolder=sub,
        folder=folder,
        weights=weights,
        lorahub_json=manifest,
        offline=True,
    )


def read_adapter(got: RemoteAdapter) -> LoraAdapter:
    """The downloaded adapter in memory; problems name the repo, not the cache path."""
    try:
        return peft.read_peft_dir(got.folder)
    except InvalidAdapter as exc:
        text = str(exc).replace(str(got.folder), got.label)
        raise InvalidAdapter(f"{got.label}: {text}; nothing was stored") from None


def read_lorahub_json(path: Path, label: str) -> tuple[str, dict[str, Any]]:
    """The digest and manifest of a ``lorahub.json``, checked to agree with each other."""
    return lorahub_json.read(path, label)


def identity(adapter: LoraAdapter, got: RemoteAdapter) -> tuple[BaseRef, dict[str, Any] | None]:
    """The base and provenance to store a pulled adapter with.

    With ``lorahub.json``: its base and provenance, after checking the adapter rebuilt from the
    downloaded files has exactly the digest it states (else ``IntegrityError``); one of an
    older manifest schema is ignored, with a warning. Without: the base named by
    ``adapter_config.json`` (unverified) and the default provenance.
    """
    if got.lorahub_json is not None:
        recorded = lorahub_json.identity(
            adapter,
            got.lorahub_json,
            got.label,
            cause="The repo was edited without lorahub, or its files are corrupt",
        )
        if recorded is not None:
            return recorded.base, recorded.provenance
    return mf.claimed_base(adapter), None


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show huggingface_hub's transfer bars only when ``enabled`` (the CLI on a TTY)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()
