"""Which thread answers a read, so metadata stays fast beside downloads and hashing.

A metadata read (model info, tree, refs, a ``HEAD``) is a millisecond of Python holding the
GIL. Forty of them in forty threads (the default pool) do not finish sooner than four: they
take turns on the GIL with the event loop, and each one's latency becomes everyone's. Measured
on 2 cores at 100,000 adapters, capping them at 1 to 4 threads answered cold ``HEAD``s 1.5x
faster with half the p99 of 8 to 40. So metadata reads run in at most
:data:`METADATA_THREADS` threads, while downloads (``GET .../resolve/...``: a blob fetched
from an object store, a merge awaited) keep the default pool.

One metadata read is not short: the first one of a new blob hashes it for its sha256, seconds
per GB. Metadata threads never hash (:func:`~lorahub.serve.files.deferring_hashes`): the
hashing runs in the default pool and the read is asked again once the value is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.to_thread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .files import HashNeeded, deferring_hashes

#: Threads answering metadata reads in each worker process.
METADATA_THREADS = 4


def is_download(segments: list[str], method: str) -> bool:
    """A ``GET`` of a repo file: it may wait on an object store or a merge."""
    return method == "GET" and len(segments) >= 5 and segments[2] == "resolve"


class ReadLanes:
    """Runs ``read(request)`` in the thread its kind calls for."""

    def __init__(
        self, read: Callable[[Request], Response], threads: int = METADATA_THREADS
    ) -> None:
        self.read = read
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop

    async def __call__(self, request: Request, segments: list[str]) -> Response:
        if is_download(segments, request.method):
            return await run_in_threadpool(self.read, request)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        while True:
            try:
                return await anyio.to_thread.run_sync(
                    self._metadata, request, limiter=self._limiter
                )
            except HashNeeded as needed:  # kept once hashed: the next try finds it
                await run_in_threadpool(needed.hash)

    def _metadata(self, request: Request) -> Response:
        with deferring_hashes():
            return self.read(request)
