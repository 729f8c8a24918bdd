"""Hub repo ids and revisions <-> lorahub names, tags and digests.

* A repo id is ``namespace/name``. A lorahub name without a namespace (``sql-expert``)
  appears under the server's default namespace (``local/sql-expert``); a name that has one
  (``team/sql-expert``) appears as itself. ``local/x`` looks up ``x`` first, then the name
  ``local/x`` itself.
* A revision is a tag (``v1`` -> ``name:v1``), ``main`` (-> ``name:latest``) or a commit id:
  40 lowercase hex, :func:`commit_id` of the adapter's digest, so the same adapter always
  has the same commit under every name and on every server.
* ``v1@llama`` is the variant of ``v1`` made for the base ``llama`` (a tag holds one adapter
  per base model): the base is a registered base's name (``lorahub base ls``), the name the
  adapter recorded, or 12+ hex of the base's content hash or signature. :func:`variant_labels`
  gives each variant the name it is listed under.
* ``v1+llama`` is ``v1`` merged into the registered base ``llama``: the full merged
  checkpoint (:mod:`lorahub.serve.merged`), its commit :func:`merged_commit_id`.
* ``@`` and ``+`` are in neither a tag nor a name, so these never collide with a tag; the
  client sends a revision as one percent-encoded path segment, so they travel as they are.
* Every part is checked against lorahub's own name and tag rules before any lookup, so a
  ``..``, a slash or a NUL in a repo id or a revision never reaches the store.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..digest import PREFIX, hex_prefix
from ..errors import InvalidReference
from ..manifest import BaseRef
from ..refs import DEFAULT_TAG, MIN_PREFIX, validate_name, validate_tag

MAIN = "main"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
VARIANT = "@"  # v1@llama: the variant of v1 for the base llama
MERGED = "+"  # v1+llama: v1 merged into the base llama
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_LABEL = 12  # hex digits of a base's fingerprint in a variant's revision name


def commit_id(digest: str) -> str:
    """The 40-hex commit id the server shows for the adapter ``digest`` (a stable function
    of it: ``sha1("lorahub-commit:" + digest)``)."""
    return hashlib.sha1(f"lorahub-commit:{digest}".encode()).hexdigest()


def merged_commit_id(digest: str, base_content_hash: str) -> str:
    """The commit id of the adapter ``digest`` merged into the base with that content hash:
    a stable function of the merge's inputs, known before any merge has run."""
    text = f"lorahub-merged:{digest}+{base_content_hash}"
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass(frozen=True)
class Revision:
    """A parsed revision: ``tag`` (None for a commit id), and the base text of a variant
    (``v1@base``) or of a merged checkpoint (``v1+base``)."""

    text: str
    tag: str | None
    base: str | None = None
    merged: bool = False


def variant_labels(bases: Sequence[BaseRef], registered: dict[str, str]) -> list[str | None]:
    """The name each variant of one ``name:tag`` is listed under (``v1@<label>``), given the
    bases the variants were made for and ``registered``: content hash -> registered base name.

    A registered base's name, else the base name the adapter recorded, when it is a valid
    name and no other variant gets it; else 12 hex of the base's fingerprint; None for an
    adapter recorded without a base fingerprint or name (it is then the tag's only one).
    """
    wanted: list[str | None] = []
    for b in bases:
        label = registered.get(b.content_hash or "") or b.name
        wanted.append(label if label and _valid_name(label) else None)
    out: list[str | None] = []
    for b, label in zip(bases, wanted, strict=True):
        if label is not None and wanted.count(label) == 1 and not _looks_hex(label):
            out.append(label)
        elif b.content_hash or b.signature:
            out.append((b.content_hash or b.signature or "").removeprefix(PREFIX)[:_HASH_LABEL])
        else:
            out.append(label)
    return out


def names_base(text: str, base: BaseRef, label: str | None, registered_name: str | None) -> bool:
    """Whether the base part of a variant revision (``v1@<text>``) names ``base``: its
    listed label, its registered or recorded name, or 12+ hex of a fingerprint."""
    if text in (label, registered_name, base.name):
        return True
    hexpart = hex_prefix(text, MIN_PREFIX)
    return hexpart is not None and any(
        (h or "").removeprefix(PREFIX).startswith(hexpart)
        for h in (base.content_hash, base.signature)
    )


def _valid_name(text: str) -> bool:
    try:
        validate_name(text)
    except InvalidReference:
        return False
    return True


def _looks_hex(text: str) -> bool:
    """A label that could be read as a fingerprint prefix is not used as one."""
    return hex_prefix(text, MIN_PREFIX) is not None


@dataclass(frozen=True)
class Mapping:
    """The server's naming rules; ``namespace`` holds names that have none."""

    namespace: str = "local"

    def __post_init__(self) -> None:
        if not _SEGMENT.match(self.namespace) or ".." in self.namespace:
            raise InvalidReference(f"invalid namespace {self.namespace!r}")

    def repo_id(self, name: str) -> str:
        """The repo id a lorahub name appears as."""
        return name if "/" in name else f"{self.namespace}/{name}"

    def names(self, repo_id: str) -> list[str]:
        """The lorahub names ``repo_id`` may stand for, in the order they are tried.

        Raises:
            InvalidReference: not ``namespace/name`` with valid parts.
        """
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_SEGMENT.match(p) and ".." not in p for p in parts):
            raise InvalidReference(f"invalid repo id {repo_id!r}: expected namespace/name")
        validate_name(repo_id)
        found = [parts[1], repo_id] if parts[0] == self.namespace else [repo_id]
        return found

    @staticmethod
    def tag(revision: str) -> str | None:
        """The tag a revision names (``main`` -> ``latest``), or None for a commit id.

        Raises:
            InvalidReference: neither a valid tag nor a commit id.
        """
        if COMMIT.match(revision):
            return None
        if revision == MAIN:
            return DEFAULT_TAG
        return validate_tag(revision)

    @classmethod
    def revision(cls, revision: str) -> Revision:
        """Parse a revision: a tag, ``main``, a commit id, ``tag@base`` or ``tag+base``.

        Raises:
            InvalidReference: a part is not a valid tag or base name.
        """
        merged = MERGED in revision
        sep = MERGED if merged else VARIANT
        if sep not in revision:
            return Revision(revision, cls.tag(revision))
        tag_text, _, base = revision.partition(sep)
        if COMMIT.match(tag_text):
            raise InvalidReference(
                f"invalid revision {revision!r}: name a tag (or main) before {sep!r}, "
                "not a commit id"
            )
        tag = cls.tag(tag_text)
        try:
            validate_name(base)
        except InvalidReference:
            raise InvalidReference(
                f"invalid revision {revision!r}: after {sep!r} give a base model's name "
                "(`lorahub base ls`) or 12+ hex of its fingerprint"
            ) from None
        return Revision(revision, tag, base, merged)
