"""Metadata answers kept in memory while the catalog's generation stands.

A model-info, tree, refs or ``HEAD resolve`` answer is a function of the catalog alone
(a merged revision's is not: it is never kept). Computing one takes catalog queries and a
model card; reading the generation (``catalog/generation.py``) takes one indexed lookup. So
each worker keeps its answers with the generation it read *before* computing them, and
gives one back only while the generation has not moved: any write, by this server, another
worker or a command, makes every kept answer stale at once. Bounded by bytes, least
recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from ..catalog.generation import current

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

_KEPT_KINDS = (Response, JSONResponse)

#: Bytes of answers one worker keeps (bodies and headers).
DEFAULT_BUDGET = 64 << 20
#: An answer bigger than this is not kept (a large tree listing): it would push out many.
_LARGEST = 1 << 20


class NotKept(Exception):
    """:meth:`KeptAnswers.peek` found no answer kept: the request needs computing."""


class KeptAnswers:
    """Answers by key, valid for one catalog generation; safe across threads."""

    def __init__(self, engine: Engine, budget: int = DEFAULT_BUDGET) -> None:
        self.engine = engine
        self.budget = budget
        self._kept: OrderedDict[Hashable, tuple[int, Response]] = OrderedDict()
        self._bytes = 0
        self._generation = -1  # what every kept answer was computed under
        self._lock = threading.Lock()

    def answer(self, key: Hashable, compute: Callable[[], Response]) -> Response:
        """``compute()``'s answer, or the one kept for ``key`` if the catalog has not
        changed since. A kept Response is shared between requests: nothing may change it
        (Starlette's ``Response.__call__`` only reads it)."""
        generation = current(self.engine)
        if generation is None:  # a database without the triggers: nothing can be trusted
            return compute()
        hit = self._lookup(key, generation)
        if hit is not None:
            return hit
        response = compute()
        self._keep(key, generation, response)
        return response

    def peek(self, key: Hashable, compute: Callable[[], Response] | None = None) -> Response:
        """The answer kept for ``key`` under the current generation (``compute`` is never
        called: it is there to take :meth:`answer`'s place).

        Raises:
            NotKept: no such answer is kept.
        """
        generation = current(self.engine)
        hit = None if generation is None else self._lookup(key, generation)
        if hit is None:
            raise NotKept(key)
        return hit

    def _lookup(self, key: Hashable, generation: int) -> Response | None:
        with self._lock:
            if generation > self._generation:
                self._kept.clear()  # all stale together: free them now
                self._bytes = 0
                self._generation = generation
            hit = self._kept.get(key) if generation == self._generation else None
            if hit is None:
                return None
            self._kept.move_to_end(key)
            return hit[1]

    def _keep(self, key: Hashable, generation: int, response: Response) -> None:
        if type(response) not in _KEPT_KINDS or not 200 <= response.status_code < 300:
            return  # a file streamed from the store is not an answer to keep
        size = len(response.body) + sum(len(k) + len(v) for k, v in response.raw_headers)
        if size > _LARGEST:
            return
        with self._lock:
            if generation != self._generation or key in self._kept:
                return  # computed under a generation that has moved on since
            self._kept[key] = (size, response)
            self._bytes += size
            while self._bytes > self.budget:
                _, (dropped, _) = self._kept.popitem(last=False)
                self._bytes -= dropped
