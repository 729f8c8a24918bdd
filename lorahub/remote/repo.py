"""Hub repo ids, revisions and paths in a repo, and the file ids the Hub lists: what push and
pull both need. Nothing here makes a request."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit, urlunsplit

from ..errors import InvalidReference
from ..refs import DEFAULT_TAG, validate_name, validate_tag

DEFAULT_REVISION = "main"
#: A full commit sha, which names a revision no branch or tag can move.
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def public_url(url: str) -> str:
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
    if revision and not COMMIT.match(revision):
        with contextlib.suppress(InvalidReference):
            tag = validate_tag(revision)
    return f"{text}:{tag}"
