"""The error answers of the served API, in the shape ``huggingface_hub`` maps to its
exceptions (``X-Error-Code``, ``X-Error-Message``, a JSON ``error``)."""

from __future__ import annotations

import errno

from starlette.responses import JSONResponse, Response


class HubError(Exception):
    """An answer the client turns into one of its errors."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        # A lone surrogate (from a client's JSON "\ud800") cannot be encoded: it is shown
        # escaped, so the answer can always be sent.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit

    def response(self) -> Response:
        # Header values are latin-1 and one line: the full text goes in the JSON body.
        line = " ".join(self.message.split()).encode("ascii", "replace").decode()
        headers = {"X-Error-Message": line}
        if self.code:
            headers["X-Error-Code"] = self.code
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return JSONResponse({"error": self.message}, self.status, headers=headers)


def disk_failure(exc: OSError, what: str) -> HubError:
    """A write the server could not make: 507 (Insufficient Storage) when the disk is full,
    else 500, each saying why, never where."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on the server's disk" if full else (exc.strerror or type(exc).__name__)
    return HubError(507 if full else 500, f"{what}: not stored, {reason}; retry later")


def repo_not_found(authenticated: bool) -> HubError:
    """A missing repo, or one the caller may not see: 401 to anonymous callers, 404 to the
    others, as the Hub answers (never saying which of the two it is)."""
    return HubError(401 if not authenticated else 404, "Repository not found", "RepoNotFound")
