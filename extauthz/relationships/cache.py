"""The in-process answer cache: TTL per answer kind, bounded size, and shared in-flight calls.

Keys come from :class:`~extauthz.relationships.openfga.CheckQuery` and
:class:`~extauthz.relationships.authzen.EvaluationQuery` and cover everything
that can change an answer (backend, store, model, user, relation, object,
contextual tuples, context; for AuthZEN the whole request). Allowed and denied
answers have their own TTL (a revoked grant should stop working sooner than a
new grant starts to), a TTL of zero disables that kind, and errors are never
stored. Entries are evicted least recently used first once ``maxEntries`` is
reached, so memory stays bounded whatever callers send.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from extauthz.relationships.base import Answer


class MemoryCache:
    def __init__(
        self, allowed_ttl: float, denied_ttl: float, max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed_ttl = allowed_ttl
        self.denied_ttl = denied_ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def get(self, key: str) -> bool | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def ttl_for(self, value: bool) -> float:
        return self.allowed_ttl if value else self.denied_ttl

    def put(self, key: str, value: bool, ttl: float | None = None) -> None:
        """Store an answer for its kind's TTL, or for ``ttl`` (what is left of a shared entry's)."""
        ttl = self.ttl_for(value) if ttl is None else min(ttl, self.ttl_for(value))
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class SingleFlight:
    """Concurrent identical questions share one backend call.

    The first asker registers a future per key and fetches; later askers of the
    same key await that future instead of calling. The fetching side always
    completes the future (``finish``), even when cancelled, so no follower is
    left waiting.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Answer]] = {}

    def join(self, key: str) -> asyncio.Future[Answer] | None:
        return self._inflight.get(key)

    def lead(self, key: str) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        return future

    def finish(self, key: str, future: asyncio.Future[Answer], answer: Answer) -> None:
        """Complete ``future`` (once) and retire it, so the next asker of ``key`` starts afresh."""
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.done():
            future.set_result(answer)

    def __len__(self) -> int:
        return len(self._inflight)
