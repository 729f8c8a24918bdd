"""Keep-alive connections spread evenly over ``lorahub serve``'s workers.

Each worker listens on a socket of its own, and the kernel hands each new connection to one
by a hash of its addresses. Clients keep their connections open, so a few dozen of them can
be split 11/21 between two workers, and the busier worker's clients wait about twice as
long. So the workers count their open connections in a small table they share (memory the
supervisor makes, :func:`create`, passed down as a descriptor), and a worker holding more
than its share plus one answers a request with ``Connection: close`` (one every
:data:`SPACING_S` at most): the client reconnects, and the kernel's hash places the new
connection again, until every worker holds its share. A client that is closed on reconnects
once, at the cost of a handshake.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from typing import Any

#: Bytes per worker in the table: one signed 64-bit count, -1 while it does not serve.
_SLOT = 8
_IDLE = (-1).to_bytes(_SLOT, sys.byteorder, signed=True)
_CLOSE = (b"connection", b"close")
#: The least time between two connections a worker closes.
SPACING_S = 0.1


def supported() -> bool:
    """Whether the table can be made: an anonymous file to share (Linux's ``memfd``)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def create(count: int) -> int | None:
    """A descriptor of a table for ``count`` workers, none of them serving yet; None where
    it cannot be made (the workers then go unbalanced)."""
    try:
        fd = os.memfd_create("lorahub-serve-connections")  # close-on-exec: pass_fds only
    except OSError:
        return None
    try:
        os.ftruncate(fd, _SLOT * count)
        os.pwrite(fd, _IDLE * count, 0)
    except OSError:
        os.close(fd)
        return None
    return fd


class Shares:
    """The table of open connections per worker, mapped from ``fd``; this worker is
    ``slot``."""

    def __init__(self, fd: int, slot: int, count: int) -> None:
        self.fd = fd  # the caller's to close (mapped, the table no longer needs it)
        self._map = mmap.mmap(fd, _SLOT * count)
        self._counts = memoryview(self._map).cast("q")
        self._slot = slot
        self.live = False  # counting this worker's connections (after serving())
        self._last_close = -SPACING_S

    def serving(self) -> None:
        """Counts this worker in from now: it takes connections."""
        self._counts[self._slot] = 0
        self.live = True

    def opened(self) -> None:
        self._counts[self._slot] += 1

    def closed(self) -> None:
        self._counts[self._slot] -= 1

    def reset(self, slot: int) -> None:
        """Marks a slot as not serving (the supervisor's, for a dead worker's replacement:
        until it serves, the others do not hand it their connections)."""
        self._counts[slot] = -1

    def over(self) -> bool:
        """Whether this worker holds more than its share of the open connections plus one,
        the share taken among the workers that serve."""
        serving = [c for c in self._counts if c >= 0]
        n = len(serving)
        return n > 1 and self._counts[self._slot] * n > sum(serving) + n

    def close_one(self) -> bool:
        """Whether to close a connection now: over its share, and none closed in the last
        :data:`SPACING_S`. The spacing lets the counts settle (connections opened at once
        are accepted in batches) and a reconnect that landed here again be counted before
        another goes: each reconnect's request waits about twice as long as others."""
        now = time.monotonic()
        if now - self._last_close < SPACING_S or not self.over():
            return False
        self._last_close = now
        return True

    def counts(self) -> list[int]:
        return list(self._counts)


#: This process's table, when it is a worker of a supervisor that made one.
current: Shares | None = None


def balanced_protocol() -> type[Any] | None:
    """uvicorn's httptools protocol (lorahub's zero-copy one) counting its connections in
    :data:`current` and closing one after an answer while this worker holds too many; None
    without httptools (the h11 protocol then runs unbalanced)."""
    from .zerocopy import PROTOCOL, HttpToolsZeroCopyProtocol

    if PROTOCOL is not HttpToolsZeroCopyProtocol:
        return None

    class BalancedProtocol(HttpToolsZeroCopyProtocol):
        _counted = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if current is not None and current.live:
                current.opened()
                self._counted = True

        def connection_lost(self, exc: Exception | None) -> None:
            self._uncount()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if (
                self._counted
                and current is not None
                and cycle is not None
                and cycle.scope is self.scope  # this request's (not an upgrade's)
                and self.scope["method"] in ("GET", "HEAD")  # never after an upload
                and current.close_one()
            ):
                cycle.keep_alive = False  # closed after the answer
                # The answer says "connection: close": uvicorn adds it itself for a cycle not
                # kept alive, older ones (0.30) only when the request said it: so it does.
                headers: Any = self.scope["headers"]
                headers.append(_CLOSE)
                self._uncount()  # now: requests read meanwhile must not close others

        def _uncount(self) -> None:
            if self._counted and current is not None:
                current.closed()
                self._counted = False

    return BalancedProtocol
