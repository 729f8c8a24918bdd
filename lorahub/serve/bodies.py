"""Request bodies read with a cap: refused (413) as soon as they pass it, never held whole
first, so a client cannot make a worker buffer more than the route allows."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from .errors import HubError
from .uploads import parse_size


async def chunks(request: Request, cap: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused (413) as soon as they pass ``cap`` bytes (or its
    Content-Length does, before any is read)."""
    length = parse_size(request.headers.get("content-length"))
    if length is not None and length > cap:
        raise HubError(413, f"request body of {length} bytes is over the limit of {cap} bytes")
    total = 0
    async for chunk in request.stream():  # a dropped client: ClientDisconnect
        total += len(chunk)
        if total > cap:
            raise HubError(413, f"request body over the limit of {cap} bytes")
        yield chunk


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refused (413) as soon as it passes ``cap`` bytes."""
    return b"".join([chunk async for chunk in chunks(request, cap)])
