"""Pull a PEFT adapter from a Hub repo into the Hugging Face cache, checked on the way.

Any PEFT adapter repo, at a branch, tag or commit, in a subfolder or not: only the adapter
files are fetched, through the shared Hugging Face cache, so a repo already there (an earlier
pull, ``hf download``, ``PeftModel.from_pretrained``) costs no download. Each file is checked
against the size and hash the Hub lists; with ``HF_HUB_OFFLINE`` the cache alone is used.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import hfenv
from .. import manifest as mf
from ..card import MAX_CARD_BYTES, ORIGIN_KEY, README, read_card
from ..dtypes import is_known, nbytes
from ..errors import CorruptData, InvalidAdapter, LorahubError, RemoteError
from ..formats import lorahub_json, peft
from ..manifest import BaseRef
from .errors import hub_errors, scrub
from .repo import (
    COMMIT,
    DEFAULT_REVISION,
    check_repo_id,
    clean_subpath,
    is_safe_repo_path,
    public_url,
)

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

log = logging.getLogger(__name__)

LORAHUB_JSON = lorahub_json.FILENAME
#: Weights at least this large get their safetensors header checked (one small range request)
#: before the download, so a lying or non-LoRA file is refused before its bytes are fetched.
HEADER_CHECK_MIN_BYTES = 8 << 20

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    card: Path | None = None  # the README.md beside the adapter, when it has one

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
        card = read_card(self.card) if self.card is not None else None
        if card is not None:  # kept beside the identity, never part of it
            origin[ORIGIN_KEY] = card
        return origin


def download_adapter(
    repo_id: str, *, revision: str | None = None, subfolder: str | None = None
) -> RemoteAdapter:
    """Fetch the adapter files of ``repo_id`` at ``revision`` into the Hugging Face cache.

    Only ``adapter_config.json``, the weights (safetensors, else ``.bin``), ``lorahub.json``
    and the model card (``README.md``) beside them are downloaded, each checked against the
    size and hash the Hub lists. With ``HF_HUB_OFFLINE`` the cache alone is used.

    Raises:
        RemoteError: missing or private repo, missing revision, gated repo, hostile listing,
            unreachable Hub. InvalidAdapter: no adapter there. CorruptData: corrupt download.
    """
    check_repo_id(repo_id)
    sub = clean_subpath(subfolder, "subfolder")
    rev = revision or DEFAULT_REVISION
    if hfenv.offline():
        return _from_cache(repo_id, rev, sub)
    return _download(repo_id, rev, sub)


def _in(sub: str | None, name: str) -> str:
    return f"{sub}/{name}" if sub else name


def _download(repo_id: str, rev: str, sub: str | None) -> RemoteAdapter:
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache

    ep = hfenv.endpoint()
    cache_dir = hfenv.hub_cache()
    api = HfApi(endpoint=ep)
    label = f"{repo_id}@{rev}"
    with hub_errors(repo_id, rev, writing=False):
        info = api.model_info(repo_id, revision=rev, files_metadata=True)
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        _refuse_hostile(repo_id, ep, siblings)
        chosen = _choose(label, sub, siblings)
        weights = chosen[1]
        size = siblings[weights].size or 0
        cached = try_to_load_from_cache(repo_id, weights, revision=info.sha, cache_dir=cache_dir)
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
                    f"{scrub(str(exc))[:200]}); refused before download"
                ) from None
        # The revision asked (not the sha) so the cache records refs/<revision> for offline use.
        folder = Path(
            snapshot_download(
                repo_id,
                revision=rev,
                allow_patterns=[glob.escape(p) for p in chosen],
                endpoint=ep,
                cache_dir=cache_dir,
            )
        )
    if folder.name != info.sha:
        raise RemoteError(
            f"{label} moved from {str(info.sha)[:12]} to {folder.name[:12]} while pulling: "
            "pull again",
            repo_id=repo_id,
            revision=rev,
        )
    for path in chosen:
        _verify(folder / path, siblings[path], label)
    manifest = _in(sub, LORAHUB_JSON)
    if manifest not in chosen:
        _ask_absent(repo_id, manifest, str(info.sha), ep, cache_dir)
    card = _in(sub, README)
    return RemoteAdapter(
        endpoint=public_url(ep),
        repo_id=repo_id,
        revision=rev,
        commit=str(info.sha),
        subfolder=sub,
        folder=folder / sub if sub else folder,
        weights=folder / weights,
        lorahub_json=folder / manifest if manifest in chosen else None,
        card=folder / card if card in chosen else None,
    )


def _ask_absent(repo_id: str, name: str, commit: str, ep: str, cache_dir: str) -> None:
    """Ask the Hub for ``name``, which the listing of ``commit`` lacks, so that its 404 is
    recorded in the cache by huggingface_hub itself: an offline pull can then tell "absent"
    from "never asked for". One small request, once per commit; best effort."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    known = try_to_load_from_cache(repo_id, name, revision=commit, cache_dir=cache_dir)
    if known is not None:  # already known absent (or, oddly, present)
        return
    try:
        hf_hub_download(repo_id, name, revision=commit, endpoint=ep, cache_dir=cache_dir)
        log.debug("%s@%s has %s although its listing did not", repo_id, commit[:12], name)
    except (EntryNotFoundError, OSError) as exc:
        # The 404 is the expected answer (now in the cache as .no_exist/<commit>/<name>);
        # any other failure only means a later offline pull warns that it cannot tell.
        log.debug("asked %s@%s for %s: %s", repo_id, commit[:12], name, exc)


def _refuse_hostile(repo_id: str, ep: str, siblings: Mapping[str, Any]) -> None:
    bad = sorted(p for p in siblings if not is_safe_repo_path(p))
    if bad:
        shown = ", ".join(repr(p) for p in bad[:5])
        raise RemoteError(
            f"refusing to pull {repo_id}: {public_url(ep)} lists file names that point outside "
            f"the repository ({shown}); a genuine Hub never does, so nothing was downloaded "
            "or stored",
            repo_id=repo_id,
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
    card = siblings.get(_in(sub, README))
    if card is not None and (card.size or 0) <= MAX_CARD_BYTES:
        chosen.append(_in(sub, README))
    return chosen


def _check_header(meta: Any, size: int, label: str) -> None:
    """Refuse a safetensors header that contradicts itself or the file size, or holds no LoRA."""
    spans = []
    for name, t in meta.tensors.items():
        begin, end = (int(x) for x in t.data_offsets)
        numel = 1
        for dim in t.shape:
            numel *= int(dim)
        code = str(t.dtype)
        if end < begin or (is_known(code) and end - begin != nbytes(code, numel)):
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

    Raises:
        CorruptData: ``expected``/``actual`` are the sizes, or the hashes, that differ.
    """
    name = path.name
    size = path.stat().st_size  # read before the bad copy is dropped
    if sibling.size is not None and size != sibling.size:
        _drop(path)
        raise CorruptData(
            f"{label}: {name} has {size} bytes, the Hub lists {sibling.size}; "
            "the cached copy was removed, pull again",
            expected=sibling.size,
            actual=size,
            path=path,
        )
    if sibling.lfs is not None:
        expected, got = sibling.lfs.sha256, _sha256(path)
    elif sibling.blob_id:
        expected, got = sibling.blob_id, _git_oid(path)
    else:
        return
    if expected != got:
        _drop(path)
        raise CorruptData(
            f"{label}: the downloaded {name} does not match the hash the Hub lists "
            f"({expected[:16]}..., got {got[:16]}...): it was altered in transit or in the "
            "cache; the bad copy was removed, nothing was stored. Pull again",
            expected=expected,
            actual=got,
            path=path,
        )


def _verify_cached(path: Path, label: str) -> None:
    """Offline, the cache blob's name is the etag the Hub gave: sha256 or git blob oid.

    Raises:
        CorruptData: ``expected`` is that name, ``actual`` what the bytes hash to.
    """
    blob = Path(os.path.realpath(path)).name
    if _SHA256.match(blob):
        got = _sha256(path)
    elif COMMIT.match(blob):
        got = _git_oid(path)
    else:
        return
    if got != blob:
        _drop(path)
        raise CorruptData(
            f"{label}: the cached {path.name} does not match its hash; the bad copy was removed. "
            "Pull again online",
            expected=blob,
            actual=got,
            path=path,
        )


def _sha256(path: Path) -> str:
    """The LFS oid of a file: huggingface_hub's sha256, read in chunks."""
    from huggingface_hub.utils.sha import sha_fileobj

    with path.open("rb") as f:
        return sha_fileobj(f).hex()


def _git_oid(path: Path) -> str:
    """The git blob id of a small (non-LFS) file, as huggingface_hub computes it."""
    from huggingface_hub.utils.sha import git_hash

    return git_hash(path.read_bytes())


def _drop(path: Path) -> None:
    """Remove a corrupt file and its cache blob, only inside the Hugging Face cache."""
    cache = Path(hfenv.hub_cache()).resolve()
    real = Path(os.path.realpath(path))
    for p in {real, path}:
        try:
            if p.resolve().is_relative_to(cache) or p.is_relative_to(cache):
                p.unlink(missing_ok=True)
        except OSError as exc:  # a read-only cache: the message still says what happened
            log.warning("could not remove %s: %s", p, exc)


def _from_cache(repo_id: str, rev: str, sub: str | None) -> RemoteAdapter:
    """The offline pull: the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    label = f"{repo_id}@{rev}"
    cache_dir = hfenv.hub_cache()

    def cached(name: str) -> Path | None:
        got = try_to_load_from_cache(repo_id, _in(sub, name), revision=rev, cache_dir=cache_dir)
        return Path(got) if isinstance(got, str) else None

    config = cached(peft.CONFIG)
    weights = cached(peft.SAFETENSORS) or cached(peft.BIN)
    if config is None or weights is None:
        raise RemoteError(
            f"HF_HUB_OFFLINE is set and {label} is not in the Hugging Face cache "
            f"({cache_dir}): pull it once online, or unset HF_HUB_OFFLINE",
            repo_id=repo_id,
            revision=rev,
        )
    manifest = cached(LORAHUB_JSON)
    card = cached(README)
    known = try_to_load_from_cache(
        repo_id, _in(sub, LORAHUB_JSON), revision=rev, cache_dir=cache_dir
    )
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
    for path in (config, weights, manifest, card):
        if path is not None:
            _verify_cached(path, label)
    log.info("offline: using the cached %s (commit %s)", label, snapshot.name)
    return RemoteAdapter(
        endpoint=public_url(hfenv.endpoint()),
        repo_id=repo_id,
        revision=rev,
        commit=snapshot.name,
        subfolder=sub,
        folder=folder,
        weights=weights,
        lorahub_json=manifest,
        offline=True,
        card=card,
    )


def read_adapter(got: RemoteAdapter) -> LoraAdapter:
    """The downloaded adapter in memory; problems name the repo, not the cache path."""
    try:
        return peft.read_peft_dir(got.folder)
    except InvalidAdapter as exc:
        text = str(exc).replace(str(got.folder), got.label)
        raise InvalidAdapter(f"{got.label}: {text}; nothing was stored") from None


def identity(adapter: LoraAdapter, got: RemoteAdapter) -> tuple[BaseRef, dict[str, Any] | None]:
    """The base and provenance to store a pulled adapter with.

    With ``lorahub.json``: its base and provenance, after checking the adapter rebuilt from the
    downloaded files has exactly the digest it states (else ``CorruptData``); one of an
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
