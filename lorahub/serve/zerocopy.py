"""Weights sent straight from the blob file with ``sendfile(2)``.

Starlette's ``FileResponse`` reads a file 64 KiB at a time, each read a hop to a worker
thread, and uvicorn implements neither ASGI's ``http.response.pathsend`` nor its
``http.response.zerocopysend``: a 1 GB blob crosses loopback at a few hundred MB/s. So
``lorahub serve`` runs uvicorn with :class:`HttpToolsZeroCopyProtocol` (its httptools
protocol; :class:`H11ZeroCopyProtocol`, its h11 one, where httptools is missing) plus the
zero-copy send extension, which hands the socket to ``loop.sendfile`` (the kernel copies the
page cache to the socket; no byte passes through Python), and the weights are answered by
:class:`BlobResponse`, which uses the extension when the server offers it and falls back to
``FileResponse`` (with bigger reads) under any other ASGI server.

The response's framing stays uvicorn's: the headers go through it, and the file's bytes are
accounted for as if they had too (h11: as a placeholder of the right length, through
``Connection.send_with_data_passthrough``, made for this; httptools: off the
``Content-Length`` the cycle expects), so ``Content-Length`` and keep-alive stay right.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    _HTTPTOOLS = True
except ImportError:  # httptools not installed: the h11 protocol alone
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]
    _HTTPTOOLS = False

#: The ASGI extension (https://asgi.readthedocs.io/en/latest/extensions.html).
ZEROCOPY = "http.response.zerocopysend"

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DIGITS = 18  # the longest offset read as a number: under 2**63
_FALLBACK_CHUNK = 1 << 20


class _Body:
    """h11's stand-in for the file's bytes: only its length is read."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


def _offer_zerocopy(protocol: Any) -> None:
    """Wrap ``protocol``'s app so each HTTP request's scope offers the zero-copy extension,
    its messages going to ``protocol._sendfile(message, send)``; nothing under uvloop (no
    ``loop.sendfile``: BlobResponse then reads the file itself)."""
    if not isinstance(protocol.loop, asyncio.BaseEventLoop):
        return
    inner = protocol.app

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        scope["extensions"] = {**scope.get("extensions", {}), ZEROCOPY: {}}

        async def send_zerocopy(message: Message) -> None:
            if message["type"] == ZEROCOPY:
                await protocol._sendfile(message, send)
            else:
                await send(message)

        await inner(scope, receive, send_zerocopy)

    protocol.app = app


def _span_of(message: Message) -> tuple[Any, int, int]:
    """``(file, offset, count)`` of a zero-copy send message (the ASGI defaults filled in)."""
    file = message["file"]
    offset = message.get("offset")
    offset = file.tell() if offset is None else offset
    count = message.get("count")
    count = os.fstat(file.fileno()).st_size - offset if count is None else count
    return file, offset, count


async def _sendfile(protocol: Any, cycle: Any, file: Any, offset: int, count: int) -> bool:
    """``count`` bytes of ``file`` from ``offset`` to the protocol's socket by the kernel;
    False when the client went away (or the transport closed): the cycle is then marked
    disconnected and the connection closed, as uvicorn does."""
    try:
        await protocol.loop.sendfile(protocol.transport, file, offset, count)
    except (OSError, RuntimeError):
        cycle.disconnected = True
        protocol.transport.close()
        return False
    return True


class H11ZeroCopyProtocol(H11Protocol):
    """uvicorn's h11 protocol, offering ``http.response.zerocopysend`` to the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _offer_zerocopy(self)

    async def _sendfile(self, message: Message, send: Send) -> None:
        cycle = self.cycle
        if cycle.disconnected:
            return
        file, offset, count = _span_of(message)
        if self.flow.write_paused:
            await self.flow.drain()
        body = _Body(count)
        event = h11.Data(data=body)  # type: ignore[arg-type]  # h11 reads only its len()
        for part in self.conn.send_with_data_passthrough(event) or []:
            if part is not body:
                self.transport.write(part)
                continue
            if not await _sendfile(self, cycle, file, offset, count):
                return
        if not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class HttpToolsZeroCopyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (its C parser: twice the requests a second of the h11
    one), offering ``http.response.zerocopysend`` to the app.

    The response's framing stays uvicorn's: it wrote the headers, and the file's bytes are
    counted off the ``Content-Length`` it expects, as if they had gone through it. The
    cycle is the one ``send`` belongs to (with pipelined requests, ``self.cycle`` is the
    newest one read, not necessarily the one answering)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _offer_zerocopy(self)

    async def _sendfile(self, message: Message, send: Send) -> None:
        cycle: Any = getattr(send, "__self__", None)
        if cycle is None or cycle.disconnected:
            return
        file, offset, count = _span_of(message)
        if cycle.chunked_encoding or count > cycle.expected_content_length:
            raise RuntimeError("a zero-copy send needs a Content-Length that covers it")
        if self.flow.write_paused:
            await self.flow.drain()
        if not await _sendfile(self, cycle, file, offset, count):
            return
        cycle.expected_content_length -= count
        if not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class BlobResponse(Response):
    """A store blob, whole or one ``Range``, sent with ``sendfile`` where the server offers
    zero-copy send; ``headers`` (the ETag among them) are sent as given.

    ``If-Range`` is honoured against the ``ETag`` header; several ranges, a malformed or an
    malformed one are answered by Starlette's ``FileResponse`` (206 multipart, 400).
    """

    def __init__(self, path: Path, headers: dict[str, str]) -> None:
        super().__init__(headers=headers, media_type="application/octet-stream")
        self.path = path
        self.given = headers
        self.etag = next((v for k, v in headers.items() if k.lower() == "etag"), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = self._span(Headers(scope=scope))
        if ZEROCOPY not in scope.get("extensions", {}) or span is None:
            return await self._fallback(scope, receive, send)
        with open(self.path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            start, end, partial = span
            end = size if end is None else min(end, size)
            if start >= end:  # past the end (answered here: Starlette 0.39 garbles this one)
                unsatisfiable = Response(
                    status_code=416, headers={**self.given, "Content-Range": f"bytes */{size}"}
                )
                return await unsatisfiable(scope, receive, send)
            headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
            headers.append((b"content-length", str(end - start).encode()))
            status = 200
            if partial:
                status = 206
                headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if scope["method"].upper() == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": ZEROCOPY, "file": file, "offset": start, "count": end - start})

    async def _fallback(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = FileResponse(self.path, headers=self.given, media_type=self.media_type)
        response.chunk_size = _FALLBACK_CHUNK
        await response(scope, receive, send)

    def _span(self, headers: Headers) -> tuple[int, int | None, bool] | None:
        """``(start, end, partial)``: the one range asked (end exclusive, None: to the end
        of the file; ``partial``: a 206), or the whole file; None for what ``FileResponse``
        answers instead (several ranges, a suffix range, bad syntax)."""
        wanted = headers.get("range")
        if wanted is None:
            return (0, None, False)
        if_range = headers.get("if-range")
        if if_range is not None and if_range != self.etag:
            return (0, None, False)  # the client's copy is stale: the whole file
        match = _RANGE.match(wanted.strip())
        if match is None or not match.group(1):
            return None
        # Leading zeros are allowed (RFC 9110) and say nothing of a number's size.
        first, last = match.group(1), match.group(2)
        first, last = first.lstrip("0") or first[:1], last.lstrip("0") or last[:1]
        # Past 18 digits a number is past any file (and int() of thousands of digits
        # raises): such a start is unsatisfiable (416), such an end means the file's end.
        start = int(first) if len(first) <= _DIGITS else sys.maxsize
        end = int(last) + 1 if last and len(last) <= _DIGITS else None
        if end is not None and end <= start:
            return None
        return (start, end, True)


#: What ``uvicorn.run(http=...)`` takes: the class itself (a string must name one of
#: uvicorn's own protocols before 0.31); ``--workers`` processes get it by reference, as it
#: is importable. httptools where it is installed (a dependency; its wheels cover the usual
#: platforms), else h11.
PROTOCOL: type[Any] = HttpToolsZeroCopyProtocol if _HTTPTOOLS else H11ZeroCopyProtocol
