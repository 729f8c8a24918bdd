"""Hub repo ids and revisions <-> lorahub names, tags and digests.

* A repo id is ``namespace/name``. A lorahub name without a namespace (``sql-expert``)
  appears under the server's default namespace (``local/sql-expert``); a name that has one
  (``team/sql-expert``) appears as itself. ``local/x`` looks up ``x`` first, then the name
  ``local/x`` itself.
* A revision is a tag (``v1`` -> ``name:v1``), ``main`` (-> ``name:latest``) or a commit id:
  40 lowercase hex, :func:`commit_id` of the adapter's digest, so the same adapter always
  has the same commit under every name and on every server.
* Every part is checked against lorahub's own name and tag rules before any lookup, so a
  ``..``, a slash or a NUL in a repo id or a revision never reaches the store.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import InvalidReference
from ..refs import DEFAULT_TAG, validate_name, validate_tag

MAIN = "main"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def commit_id(digest: str) -> str:
    """The 40-hex commit id the server shows for the adapter ``digest`` (a stable function
    of it: ``sha1("lorahub-commit:" + digest)``)."""
    return hashlib.sha1(f"lorahub-commit:{digest}".encode()).hexdigest()


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
