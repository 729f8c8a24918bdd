"""Push a stored adapter to a Hub repo as a plain PEFT adapter folder.

Every file is a pure function of the adapter and the base's Hub repo id it names (never a
local path: see :func:`write_push_files`), so a second push of the same adapter uploads
nothing and makes no commit (the client skips files whose remote oid matches). The token is
resolved by huggingface_hub itself and never passes through lorahub's hands.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .. import hfenv
from ..digest import Digest, hash_file
from ..errors import (
    CorruptData,
    InvalidArgument,
    InvalidReference,
    RemoteConflict,
    RemoteError,
)
from ..formats.peft_folder import published_base, small_files, write_peft_folder
from .errors import http_status, hub_errors
from .repo import (
    COMMIT,
    DEFAULT_REVISION,
    check_repo_id,
    clean_subpath,
    public_url,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    from ..blobs import BlobStore
    from ..info import AdapterInfo

log = logging.getLogger(__name__)


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
        """Plain data for JSON (every field; the uploaded files as a list)."""
        d = asdict(self)
        d["files_uploaded"] = list(self.files_uploaded)
        return d


def check_weights(info: AdapterInfo, weights: Path) -> None:
    """Refuse to publish a blob that no longer matches its digest.

    Raises:
        CorruptData: the blob is missing (``actual`` None) or hashes to another digest.
    """
    try:
        got, size = hash_file(weights)
    except FileNotFoundError:
        raise CorruptData(
            f"the weights blob of {info.digest} is missing; run `lorahub verify`",
            expected=info.weights_digest,
            path=weights,
        ) from None
    if str(got) != info.weights_digest or size != info.size:
        raise CorruptData(
            f"the weights blob of {info.digest} is corrupt (hashes to {got}, expected "
            f"{info.weights_digest}); nothing was pushed. Run `lorahub verify` and re-add it",
            expected=info.weights_digest,
            actual=str(got),
            path=weights,
        )


def write_push_files(
    info: AdapterInfo,
    weights: Path,
    out: Path,
    *,
    title: str,
    path_in_repo: str | None = None,
    recorded_base: str | None = None,
    base_model_id: str | None = None,
) -> dict[str, Path]:
    """The files a push uploads, by name in the repo: small ones written to ``out``, the
    weights read straight from the blob (no copy). Nothing depends on time or local names.

    ``title`` is the repo id (the card's heading and its usage snippet's adapter id). The
    config's ``base_model_name_or_path`` and the card's ``base_model`` name the base by its
    Hub repo id, as an export's do (:func:`~lorahub.formats.peft_folder.published_base`):
    ``base_model_id``, else ``recorded_base`` (the recorded base's), else the config's value
    when it is one, else null; a rewrite is recorded in ``lorahub.json``, so a pull restores
    the stored value and the digest.

    Raises:
        InvalidReference: ``base_model_id`` is not a Hub repo id.
    """
    return write_peft_folder(
        info,
        weights,
        out,
        copy_weights=False,
        **_push_folder(info, title, path_in_repo, recorded_base, base_model_id),
    )


def push_small_files(
    info: AdapterInfo,
    *,
    title: str,
    path_in_repo: str | None = None,
    recorded_base: str | None = None,
    base_model_id: str | None = None,
) -> dict[str, bytes]:
    """The bytes of the small files :func:`write_push_files` writes (all but the weights),
    made in memory: what ``lorahub serve`` answers for a repo."""
    folder = _push_folder(info, title, path_in_repo, recorded_base, base_model_id)
    return small_files(info, **folder)


def _push_folder(
    info: AdapterInfo,
    title: str,
    path_in_repo: str | None,
    recorded_base: str | None,
    base_model_id: str | None,
) -> dict[str, Any]:
    """The folder arguments of a push (``peft_folder``'s)."""
    config_base, card_base = published_base(
        info, base_model_id=base_model_id, recorded_base=recorded_base
    )
    return {
        "title": title,
        "list_files": False,
        "repo_id": title,
        "subfolder": path_in_repo,
        "base_model_id": card_base,
        "rewrite_base": True,
        "config_base": config_base,
    }


def push_adapter(
    blobs: BlobStore,
    info: AdapterInfo,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    tag: str | None = None,
    path_in_repo: str | None = None,
    recorded_base: str | None = None,
    base_model_id: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push a stored adapter (its info; its weights blob is read from ``blobs``) to
    ``repo_id`` as a folder PEFT loads: config, weights, model card and ``lorahub.json``.

    The repo is created if needed (``private`` applies then), and the branch ``revision``;
    the commit is tagged ``tag``; files already there are not uploaded again, and an
    unchanged repo gets no commit. The token is huggingface_hub's own (``HF_TOKEN``,
    ``hf auth login``); lorahub never handles it. The config's ``base_model_name_or_path``
    and the card name the base by its Hub repo id only, never a local path: ``base_model_id``,
    else ``recorded_base`` (the recorded base's), else the config's when it is one, else
    null (see :func:`write_push_files`). ``endpoint`` replaces ``HF_ENDPOINT`` (see
    :func:`push_files`).

    Raises:
        InvalidReference: ``repo_id`` or ``base_model_id`` is not a Hub repo id.
        RemoteConflict: ``tag`` exists at another commit, or ``private`` asked of a public
            repo.
        RemoteError: no token or no write access, ``HF_HUB_OFFLINE`` set, an unreachable Hub.
        CorruptData: the weights blob does not match the adapter's digest.
    """
    check_repo_id(repo_id)
    if base_model_id is not None:
        check_repo_id(base_model_id)
    weights = blobs.local_path(Digest.parse(info.weights_digest))
    check_weights(info, weights)
    with tempfile.TemporaryDirectory(prefix="lorahub-push-") as tmp:
        files = write_push_files(
            info,
            weights,
            Path(tmp),
            title=repo_id,
            path_in_repo=clean_subpath(path_in_repo, "path in repo"),
            recorded_base=recorded_base,
            base_model_id=base_model_id,
        )
        result = push_files(
            repo_id,
            files,
            private=private,
            revision=revision,
            tag=tag,
            path_in_repo=path_in_repo,
            commit_message=f"Upload LoRA adapter {info.short} with lorahub",
            endpoint=endpoint,
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
    endpoint: str | None = None,
) -> PushResult:
    """Commit ``files`` (name in repo -> local path) to a branch, creating repo and branch if
    needed; unchanged files are not uploaded and an unchanged repo gets no commit.

    ``endpoint`` (default ``HF_ENDPOINT``) names another Hub, such as a ``lorahub serve``:
    then uploads go through LFS, not Xet, for the rest of this process
    (``HF_HUB_DISABLE_XET``), as such a server speaks no Xet.

    Raises:
        RemoteConflict: a tag that exists elsewhere, or ``private`` asked of a public repo.
        RemoteError: no token, no write access, a failed request.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    prefix = clean_subpath(path_in_repo, "path in repo")
    branch = revision or DEFAULT_REVISION
    if COMMIT.match(branch):
        raise InvalidReference(f"cannot push to commit {branch}: --revision must name a branch")
    ep = endpoint.rstrip("/") if endpoint else hfenv.endpoint()
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidArgument(
                f"invalid endpoint {endpoint!r}: give the server's URL, e.g. http://hub:8000"
            )
        _disable_xet()
    if hfenv.offline():  # set after huggingface_hub was imported, which would still push
        raise RemoteError(
            f"HF_HUB_OFFLINE is set, so {public_url(ep)} cannot be reached for {repo_id}: "
            "unset it to push",
            repo_id=repo_id,
            revision=branch,
        )
    # token=True: pushing always needs the user's token, resolved by huggingface_hub itself.
    api = HfApi(endpoint=ep, token=True)
    with hub_errors(repo_id, branch, writing=True):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = getattr(repo_url, "repo_id", None) or repo_id
        before = _branch_info(api, full_id, branch)
        if private and not before.private:
            raise RemoteConflict(
                f"{full_id} already exists and is public; --private only applies when the repo "
                "is created. Make it private in its settings on the Hub, or push without --private",
                target=full_id,
                repo_id=full_id,
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
    url = f"{public_url(ep)}/{full_id}{tree}" + (f"/{prefix}" if prefix else "")
    return PushResult(
        repo_id=full_id,
        revision=branch,
        commit=sha,
        commit_url=public_url(str(commit.commit_url)),
        url=url,
        committed=committed,
        bytes_uploaded=size if committed else 0,
        files_uploaded=tuple(changed) if committed else (),
        tag=tag,
        path_in_repo=prefix,
    )


def _disable_xet() -> None:
    """Upload through LFS from now on: the variable for child processes, the constant for
    this one (huggingface_hub read the variable at import, and checks the constant on each
    upload)."""
    import os

    from huggingface_hub import constants

    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants.HF_HUB_DISABLE_XET = True


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


def _unchanged(sibling: RepoSibling | None, op: Any, local: Path) -> bool:
    """Whether the repo already holds this exact file (same test the client makes)."""
    if sibling is None:
        return False
    if sibling.size is not None and sibling.size != op.upload_info.size:
        return False
    if sibling.lfs is not None:
        return bool(sibling.lfs.sha256 == op.upload_info.sha256.hex())
    from huggingface_hub.utils.sha import git_hash

    return sibling.blob_id is not None and sibling.blob_id == git_hash(local.read_bytes())


def _tag_target(api: HfApi, repo_id: str, tag: str) -> str | None:
    """The commit ``tag`` points at in ``repo_id``, or None when there is no such tag."""
    return next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)


def _check_tag_free(api: HfApi, repo_id: str, tag: str, head: str | None) -> None:
    """Refuse, before committing anything, a tag that exists at another commit than the one
    the push will leave (``head``: the branch head when nothing changes; None when a new
    commit is coming, which no existing tag can point at). The ``RemoteConflict``'s
    ``revision`` is the commit the tag names now."""
    current = _tag_target(api, repo_id, tag)
    if current is not None and current != head:
        raise RemoteConflict(
            f"tag {tag!r} already exists in {repo_id} at commit {current[:12]}; nothing was "
            f"pushed: choose another tag, or delete it first (`hf repos tag delete {repo_id} "
            f"{tag}`)",
            target=tag,
            repo_id=repo_id,
            revision=current,
        )


def _ensure_tag(api: HfApi, repo_id: str, tag: str, sha: str) -> None:
    """Tag ``sha``; an existing tag is fine only if it already points there (else a
    ``RemoteConflict`` whose ``revision`` is the commit the tag names, when known)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=sha)
        return
    except HfHubHTTPError as exc:
        if http_status(exc) != 409:
            raise
    current = _tag_target(api, repo_id, tag)
    if current != sha:
        where = f"commit {current[:12]}" if current else "another revision"
        raise RemoteConflict(
            f"tag {tag!r} already exists in {repo_id} at {where}, not at the pushed commit "
            f"{sha[:12]}: choose another tag, or delete it first "
            f"(`hf repos tag delete {repo_id} {tag}`)",
            target=tag,
            repo_id=repo_id,
            revision=current,
        )
