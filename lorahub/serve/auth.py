"""Who is calling, and what they may do: the ``Authorization: Bearer`` token of a request
checked against the store's tokens (``lorahub token``), and each route's read or write right.

The answers are the Hub's, which ``huggingface_hub`` turns into its exceptions
(HUB-PROTOCOL.md 1.4):

* a token that is sent must be valid, on every route: else 401 ``Invalid credentials in
  Authorization header`` (a plain ``HfHubHTTPError``);
* a repo the caller may not read: 401 ``RepoNotFound`` to anonymous callers, 404 to a token
  (``RepositoryNotFoundError``), never saying whether it exists;
* a download in a ``--gated`` namespace without a token for it: 401 (anonymous) or 403
  ``GatedRepo`` (``GatedRepoError``); its model info stays visible to whoever may read;
* a write: 401 without a token, 403 without the write right for that namespace.

Tokens are read from the catalog, shared by every ``--workers`` process; a valid token is
remembered for :data:`CACHE_TTL_S` at most, so ``lorahub token rm`` takes effect within that
in every process, without a restart. The secret itself is never logged or echoed: only its
sha256 is kept, even in the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from starlette.requests import Request

from ..errors import LorahubError
from ..tokens import LAST_USED_RESOLUTION, TokenInfo, secret_hash
from .errors import HubError, repo_not_found

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger(__name__)

#: How long a checked token is trusted without asking the catalog again.
CACHE_TTL_S = 1.0
_CACHE_MAX = 1024
INVALID = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Caller:
    """The caller of one request: a token's name and rights, or anonymous (``name`` None)."""

    name: str | None = None
    can_write: bool = False
    namespaces: frozenset[str] | None = None  # None: every namespace

    @property
    def authenticated(self) -> bool:
        return self.name is not None

    def covers(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    @classmethod
    def of(cls, info: TokenInfo) -> Caller:
        return cls(info.name, info.can_write, frozenset(info.namespaces) or None)


ANONYMOUS = Caller()


class Auth:
    """The server's access rule over ``hub``'s tokens. Anonymous callers may read only
    with ``allow_anonymous``; downloads from a ``gated`` namespace need a token for it."""

    def __init__(self, hub: Hub | None, allow_anonymous: bool, gated: Iterable[str] = ()) -> None:
        self.hub = hub
        self.allow_anonymous = allow_anonymous
        self.gated = frozenset(gated)
        self._cache: dict[str, tuple[float, TokenInfo]] = {}  # sha256 -> (expiry, token)
        self._lock = threading.Lock()
        self._marking: set[str] = set()

    def caller(self, request: Request) -> Caller:
        """The request's caller; a token that is sent must be valid (else 401)."""
        header = request.headers.get("authorization")
        if header is None:
            return ANONYMOUS
        scheme, _, secret = header.strip().partition(" ")
        info = self._check(secret.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            log.debug("refused %s %s: unknown token", request.method, request.url.path)
            raise HubError(401, INVALID)
        return Caller.of(info)

    def known_caller(self, request: Request) -> Caller | None:
        """The caller when telling costs no catalog read (anonymous, or a token checked in
        the last :data:`CACHE_TTL_S`), else None: what the event loop may ask itself."""
        header = request.headers.get("authorization")
        if header is None:
            return ANONYMOUS
        scheme, _, secret = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        with self._lock:
            hit = self._cache.get(secret_hash(secret.strip()))
        return Caller.of(hit[1]) if hit is not None and hit[0] > time.monotonic() else None

    def _check(self, secret: str) -> TokenInfo | None:
        if not secret or self.hub is None:
            return None
        key = secret_hash(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = self.hub.check_token(secret)
        with self._lock:
            if info is None:
                self._cache.pop(key, None)
                return None
            if len(self._cache) >= _CACHE_MAX:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
            self._cache[key] = (now + CACHE_TTL_S, info)
        log.debug("token %r checked (%s)", info.name, info.scope)
        self._mark_used(info)
        return info

    def _mark_used(self, info: TokenInfo) -> None:
        """Update the token's ``last_used_at`` when it is older than
        ``LAST_USED_RESOLUTION``, in a thread of its own: no request waits on a catalog
        write, and a process starts at most one such write per token at a time."""
        hub = self.hub
        now = datetime.now(timezone.utc)
        if hub is None or (info.last_used_at and now - info.last_used_at < LAST_USED_RESOLUTION):
            return
        with self._lock:
            if info.name in self._marking:
                return
            self._marking.add(info.name)

        def mark() -> None:
            try:
                hub.mark_token_used(info)
            except LorahubError as exc:  # a busy or read-only catalog: the date can wait
                log.debug("could not record the use of token %r: %s", info.name, exc)
            finally:
                with self._lock:
                    self._marking.discard(info.name)

        threading.Thread(target=mark, name="lorahub-token-used", daemon=True).start()

    def can_read(self, caller: Caller, namespace: str) -> bool:
        """Whether the caller may see repos in ``namespace`` (listing, info, files)."""
        return self.allow_anonymous or (caller.authenticated and caller.covers(namespace))

    def may_read(self, caller: Caller, namespace: str) -> None:
        """Raise the Hub's answer for a repo the caller may not see."""
        if not self.can_read(caller, namespace):
            raise repo_not_found(caller.authenticated)

    def may_download(self, caller: Caller, namespace: str) -> None:
        """:meth:`may_read`, then, in a gated namespace, a token for it (else GatedRepo)."""
        self.may_read(caller, namespace)
        if namespace in self.gated and not (caller.authenticated and caller.covers(namespace)):
            raise HubError(
                401 if not caller.authenticated else 403,
                f"Access to repositories in {namespace!r} is restricted: downloads need a "
                f"token for that namespace (lorahub token add NAME --namespace {namespace})",
                "GatedRepo",
            )

    def may_write(self, caller: Caller, namespace: str) -> None:
        """Raise 401 (anonymous) or 403 (no write right here) unless the caller may write."""
        if not caller.authenticated:
            raise HubError(401, "You must be authenticated to write")
        if not (caller.can_write and caller.covers(namespace)):
            raise HubError(403, f"token {caller.name!r} may not write to {namespace!r}")

    def whoami(self, caller: Caller) -> dict[str, object]:
        """The ``/api/whoami-v2`` answer for a token (401 for an anonymous caller)."""
        if not caller.authenticated:
            raise HubError(401, "Invalid username or password.")
        role = "write" if caller.can_write else "read"
        orgs = sorted(caller.namespaces or ())
        return {
            "type": "user",
            "id": caller.name,
            "name": caller.name,
            "fullname": caller.name,
            "orgs": [{"name": ns, "type": "org"} for ns in orgs],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": caller.name, "role": role},
            },
        }
