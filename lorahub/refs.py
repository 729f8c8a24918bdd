"""References: ``name``, ``name:tag``, ``@xxh128:<hex>``, ``xxh128:<hex>`` or a hex prefix."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .digest import PREFIX
from .errors import InvalidReference

DEFAULT_TAG = "latest"
# How a path is told from a reference: written this way, it is a path, never a name.
PATH_PREFIXES = ("./", "../", "/", "~")
MIN_PREFIX = 12  # DESIGN.md: a unique digest prefix of 12+ hex
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``prefix`` is set for digest references (full or partial);
    ``name`` is set for names. A bare hex string sets both: names win, like docker."""

    text: str
    name: str | None = None
    tag: str = DEFAULT_TAG
    prefix: str | None = None

    @property
    def is_digest(self) -> bool:
        return self.name is None

    def __str__(self) -> str:
        return self.text


def validate_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise InvalidReference(
            f"invalid name {name!r}: use letters, digits, '.', '_' and '-' "
            "(optionally 'namespace/name'), starting with a letter or digit"
        )
    return name


def validate_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise InvalidReference(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-'")
    return tag


def parse(text: str) -> Reference:
    """Parse a reference string.

    >>> parse("sql-expert:v1").tag
    'v1'
    """
    raw = text.strip()
    if not raw:
        raise InvalidReference("empty reference")
    if raw.startswith(PATH_PREFIXES):
        raise InvalidReference(
            f"{raw!r} is a path, not a stored adapter: add it first (`lorahub add {raw}`), "
            "then use its name or digest"
        )
    body = raw[1:] if raw.startswith("@") else raw
    lowered = body.lower()
    if lowered.startswith(PREFIX):
        hexpart = lowered[len(PREFIX) :]
        if not _HEX.match(hexpart) or not MIN_PREFIX <= len(hexpart) <= 32:
            raise InvalidReference(
                f"invalid digest {raw!r}: expected xxh128:<{MIN_PREFIX} to 32 hex digits>"
            )
        return Reference(raw, prefix=hexpart)
    if raw.startswith("@"):
        if not _HEX.match(lowered) or not MIN_PREFIX <= len(lowered) <= 32:
            raise InvalidReference(f"invalid digest {raw!r}: give at least {MIN_PREFIX} hex digits")
        return Reference(raw, prefix=lowered)
    name, sep, tag = body.rpartition(":") if ":" in body else (body, "", DEFAULT_TAG)
    if not sep:
        name, tag = body, DEFAULT_TAG
    validate_name(name)
    validate_tag(tag)
    prefix = (
        lowered if not sep and _HEX.match(lowered) and MIN_PREFIX <= len(lowered) <= 32 else None
    )
    return Reference(raw, name=name, tag=tag, prefix=prefix)


def local_path(text: str) -> Path | None:
    """The adapter file or folder ``text`` names when it is a path rather than a store
    reference, else None.

    Written as a path (``./x``, ``../x``, ``/x``, ``~/x``), it is one whether or not it
    exists, so a typo gets "does not exist" rather than "invalid name". Anything else is a
    path only when it exists and could not be a reference (``adapters/sql/v1``): a valid
    name wins over a folder of the same name in the current directory, as in docker.
    """
    if text.startswith(PATH_PREFIXES) or text in (".", ".."):
        return Path(text).expanduser()
    if os.sep != "/" and text.startswith(("." + os.sep, ".." + os.sep)):
        return Path(text)
    try:
        parse(text)
    except InvalidReference:
        path = Path(text)
        return path if path.exists() else None
    return None


def format_ref(name: str, tag: str) -> str:
    return f"{name}:{tag}"
