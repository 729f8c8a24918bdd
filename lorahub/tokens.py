"""Access tokens of ``lorahub serve``, kept in the catalog (``lorahub token add|ls|rm``).

A token is a name (unique, ``[a-z0-9._-]``), a scope (``read``, or ``write`` which implies
read), optionally the namespaces it is limited to (none: every namespace), and a secret
``lh_<43 url-safe characters>`` shown once, when it is made. The catalog keeps only the
secret's sha256:

* The secret is 256 random bits from :mod:`secrets`, not a password a person chose, so a
  fast hash is enough: nobody can enumerate 2**256 candidates, and a slow hash (bcrypt,
  scrypt) would only add its cost to every request the server answers. Anyone reading the
  catalog (a backup, a shared PostgreSQL) learns the hashes, which open nothing.
* A request's secret is found by its hash (an indexed, unique column), then compared with
  :func:`hmac.compare_digest`, so the comparison takes the same time whatever it matches.

Every server process reads tokens from the catalog, so ``token rm`` takes effect in all of
them without a restart (``lorahub.serve.auth`` caches a hit for about a second). Tokens are
not in the store's record files: ``fsck`` rebuilding a lost catalog does not restore them
(make them again).

>>> new = create_token(store, "ci", write=True, namespaces=["team"])  # doctest: +SKIP
>>> verify_token(store, new.secret).name  # doctest: +SKIP
'ci'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from .errors import Conflict, InvalidArgument, NotFound
from .lazy import lazy_module

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .catalog import db, models
    from .store import Store
else:
    db = lazy_module("lorahub.catalog.db")
    models = lazy_module("lorahub.catalog.models")

PREFIX = "lh_"
READ, WRITE = "read", "write"
#: ``last_used_at`` is rewritten at most this often per token: a write per request would
#: make every read a write transaction.
LAST_USED_RESOLUTION = timedelta(minutes=10)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# The segment rule of repo ids (lorahub.serve.mapping), which this layer may not import.
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_SECRET = 256  # far above any secret made here; longer input is not looked up


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never its secret."""

    name: str
    scope: str  # read | write
    namespaces: tuple[str, ...]  # empty: every namespace
    created_at: datetime
    last_used_at: datetime | None = None

    @property
    def can_write(self) -> bool:
        return self.scope == WRITE

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
            "namespaces": list(self.namespaces) or None,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
        }


@dataclass(frozen=True)
class NewToken:
    """A token just made, with its secret: the only time the secret is known."""

    info: TokenInfo
    secret: str

    def __repr__(self) -> str:  # a stray print or log of the object must not show it
        return f"NewToken(info={self.info!r}, secret='{PREFIX}...')"

    def to_dict(self) -> dict[str, Any]:
        return {**self.info.to_dict(), "token": self.secret}


def secret_hash(secret: str) -> str:
    """The sha256 (hex) the catalog keeps for ``secret``."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def validate_token_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid token name {name!r}: use 1-64 lowercase letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return name


def _namespaces(namespaces: Iterable[str]) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(namespaces))
    for ns in found:
        if not _NAMESPACE.match(ns) or ".." in ns:
            raise InvalidArgument(
                f"invalid namespace {ns!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit (the first part of a repo id)"
            )
    return tuple(sorted(found))


def _info(row: models.Token) -> TokenInfo:
    return TokenInfo(
        name=row.name,
        scope=row.scope,
        namespaces=tuple(json.loads(row.namespaces)),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _row(s: Session, name: str) -> models.Token | None:
    from sqlalchemy import select

    return s.scalars(select(models.Token).where(models.Token.name == name)).first()


def create_token(
    store: Store, name: str, *, write: bool = False, namespaces: Iterable[str] = ()
) -> NewToken:
    """Make a token; its secret is in the result and nowhere else.

    Raises:
        InvalidArgument: a bad name or namespace. Conflict: a token of that name exists.
    """
    from sqlalchemy.exc import IntegrityError

    validate_token_name(name)
    limited = _namespaces(namespaces)
    secret = PREFIX + secrets.token_urlsafe(32)
    row = models.Token(
        name=name,
        secret_sha256=secret_hash(secret),
        scope=WRITE if write else READ,
        namespaces=json.dumps(list(limited)),
        created_at=datetime.now(timezone.utc),
        last_used_at=None,
    )
    taken = Conflict(
        f"a token named {name!r} exists; remove it first (`lorahub token rm {name}`) or "
        "choose another name",
        target=name,
    )
    try:
        with db.write_session(store.engine) as s:
            if _row(s, name) is not None:
                raise taken
            s.add(row)
            s.flush()
            info = _info(row)
    except IntegrityError:  # made at the same moment by another process
        raise taken from None
    return NewToken(info, secret)


def list_tokens(store: Store) -> list[TokenInfo]:
    """Every token, by name."""
    from sqlalchemy import select

    with db.read_session(store.engine) as s:
        rows = s.scalars(select(models.Token).order_by(models.Token.name))
        return [_info(r) for r in rows]


def remove_token(store: Store, name: str) -> TokenInfo:
    """Delete the token ``name``; requests carrying it fail from then on.

    Raises:
        NotFound: no token has that name.
    """
    with db.write_session(store.engine) as s:
        row = _row(s, name)
        if row is None:
            raise NotFound(f"no token named {name!r}; see `lorahub token ls`")
        info = _info(row)
        s.delete(row)
    return info


def verify_token(store: Store, secret: str) -> TokenInfo | None:
    """The token whose secret is ``secret``, or None: an unknown secret is an answer, not
    an error (the server turns it into a 401)."""
    from sqlalchemy import select

    if not secret.startswith(PREFIX) or len(secret) > _MAX_SECRET:
        return None
    digest = secret_hash(secret)
    with db.read_session(store.engine) as s:
        row = s.scalars(select(models.Token).where(models.Token.secret_sha256 == digest)).first()
        if row is None or not hmac.compare_digest(row.secret_sha256, digest):
            return None
        return _info(row)


def mark_used(store: Store, info: TokenInfo, now: datetime | None = None) -> bool:
    """Record that ``info`` was used, when its ``last_used_at`` is older than
    :data:`LAST_USED_RESOLUTION` (so at most one write per token every few minutes);
    returns whether it wrote."""
    from sqlalchemy import update

    now = now or datetime.now(timezone.utc)
    if info.last_used_at is not None and now - info.last_used_at < LAST_USED_RESOLUTION:
        return False
    with db.write_session(store.engine) as s:
        s.execute(
            update(models.Token).where(models.Token.name == info.name).values(last_used_at=now)
        )
    return True
