"""The optional shared answer cache in Redis, so sidecar replicas reuse each other's answers.

Same keys and TTL semantics as the in-process cache, with the answer's absolute
expiry stored beside it (``"1:<unix ms>"``): a replica that copies an entry into
its own memory keeps it only for what is left of the TTL, so a removed tuple
still stops working within the configured TTL, not twice that.

Redis is an optimisation, never a dependency: every command has the policy's
``redis.timeoutMs`` as a hard bound (a retry included), any error counts
as a miss, and after an error Redis is left alone for a second (one log line
when it goes away, one when it is back) so an outage costs nothing per request.
Writes happen in the background after the answer is returned, and are dropped
rather than queued without bound when Redis is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from extauthz.eager import in_task
from extauthz.observability import metrics

log = structlog.get_logger("extauthz.relationships")

PREFIX = "extauthz:rel:v1:"
_PAUSE_SECONDS = 1.0
_MAX_PENDING_WRITES = 1000


class RedisCache:
    def __init__(self, url: str, timeout_ms: int) -> None:
        self.timeout = timeout_ms / 1000
        parts = urlsplit(url)
        self.where = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        """The URL without credentials, for log lines."""
        # One immediate retry, on connection errors only: a pooled connection that Redis
        # closed (a restart) reconnects at once; a timeout is never retried.
        self._client = Redis.from_url(
            url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), health_check_interval=0,
        )
        self._paused_until = 0.0
        self._down = False
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._paused_until

    async def get_many(self, keys: Sequence[str]) -> dict[str, tuple[bool, float]]:
        """Shared answers for these keys as (answer, seconds left); empty on any trouble."""
        if not keys:
            return {}
        if not self.available:
            metrics.child(metrics.relationship_cache, "redis", "paused").inc(len(keys))
            return {}
        await in_task()  # the timeout cancels the current task
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self._client.mget([PREFIX + key for key in keys])
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            metrics.child(metrics.relationship_cache, "redis", "error").inc(len(keys))
            return {}
        self._ok()
        now_ms = time.time() * 1000
        found: dict[str, tuple[bool, float]] = {}
        for key, value in zip(keys, raw, strict=True):
            parsed = _parse(value, now_ms)
            if parsed is not None:
                found[key] = parsed
        metrics.child(metrics.relationship_cache, "redis", "hit").inc(len(found))
        metrics.child(metrics.relationship_cache, "redis", "miss").inc(len(keys) - len(found))
        return found

    def put(self, key: str, value: bool, ttl: float) -> None:
        """Store in the background; the request never waits for Redis to accept a write."""
        if ttl <= 0 or not self.available or len(self._writes) >= _MAX_PENDING_WRITES:
            return
        task = asyncio.create_task(self._set(key, value, ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set(self, key: str, value: bool, ttl: float) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        expires_ms = int(time.time() * 1000) + ttl_ms
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.set(PREFIX + key, f"{int(value)}:{expires_ms}", px=ttl_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self._ok()

    def _failed(self, exc: BaseException) -> None:
        self._paused_until = time.monotonic() + _PAUSE_SECONDS
        if not self._down:
            self._down = True
            log.warning("relationship_redis_unavailable", redis=self.where, error=type(exc).__name__,
                        note="answers come from the in-process cache and the backends until it is back")

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.info("relationship_redis_available", redis=self.where)

    async def drain(self) -> None:
        """Wait for the background writes started so far (each is bounded by the Redis timeout)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def _parse(value: object, now_ms: float) -> tuple[bool, float] | None:
    """``b"1:<expiry ms>"`` -> (True, seconds left); anything unexpected or expired is a miss."""
    if not isinstance(value, bytes):
        return None
    answer, _, expires = value.partition(b":")
    if answer not in (b"0", b"1") or not expires.isdigit():
        return None
    left = (int(expires) - now_ms) / 1000
    return (answer == b"1", left) if left > 0 else None
