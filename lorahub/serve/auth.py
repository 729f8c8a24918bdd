"""Who is calling, and what they may do: the ``Authorization: Bearer`` token of a request
checked against the store's tokens, and each route's read or write right."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from .errors import HubError, repo_not_found


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


ANONYMOUS = Caller()


class Auth:
    """The server's access rule. Anonymous callers may read only when ``allow_anonymous``."""

    def __init__(self, allow_anonymous: bool) -> None:
        self.allow_anonymous = allow_anonymous

    def caller(self, request: Request) -> Caller:
        """The request's caller; a token that is sent must be valid (else 401)."""
        if request.headers.get("authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        return ANONYMOUS

    def may_read(self, caller: Caller, namespace: str) -> None:
        """Raise the Hub's answer for a repo the caller may not see."""
        if caller.authenticated and caller.covers(namespace):
            return
        if not caller.authenticated and self.allow_anonymous:
            return
        raise repo_not_found(caller.authenticated)

    def may_write(self, caller: Caller, namespace: str) -> None:
        """Raise 401 (anonymous) or 403 (no write right here) unless the caller may write."""
        if not caller.authenticated:
            raise HubError(401, "You must be authenticated to write")
        if not (caller.can_write and caller.covers(namespace)):
            raise HubError(403, f"token {caller.name!r} may not write to {namespace!r}")
