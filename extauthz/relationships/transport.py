"""One JSON POST to a relationship backend, inside a fixed time budget, with at most one retry.

The budget is the backend's ``timeoutMs``: it bounds the whole call, connection,
credentials, a retry and any wait before it, so a check always ends well inside
Envoy's ext_authz timeout. A retry happens at most once and only where it can
help: a refused or reset connection (a pooled keep-alive connection the server
had closed), a 5xx, a 429 or a 401 answered to a credential that was just
rotated. A ``Retry-After`` is honoured only when the wait and a useful attempt
still fit in the budget; otherwise the call gives up at once. Nothing here
ever sleeps past the budget, unlike the official SDK's long back-offs.

The client is aiohttp, chosen by measurement (docs/relationships.md, ``python
-m bench.relationships``): about 5x less CPU per call than httpx on this path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from extauthz.eager import in_task
from extauthz.observability import metrics
from extauthz.relationships.auth import Credentials
from extauthz.relationships.base import Cause, Failure

_MIN_ATTEMPT_SECONDS = 0.01
"""A retry is not worth starting with less time than this left."""

_JSON = {"content-type": "application/json", "accept": "application/json"}


class Transport:
    """POSTs JSON for one backend over a shared keep-alive pool; answers parsed JSON or a Failure."""

    def __init__(
        self, session: aiohttp.ClientSession, backend: str, budget_seconds: float,
        credentials: Credentials | None = None,
    ) -> None:
        self.session = session
        self.backend = backend
        self.budget = budget_seconds
        self.credentials = credentials

    async def post(self, url: str, body: Any, api: str) -> Any | Failure:
        data = orjson.dumps(body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        attempt = 0
        while True:
            attempt += 1
            result, retry_after = await self._attempt(url, data, api, deadline - loop.time())
            if not isinstance(result, Failure) or retry_after is None or attempt == 2:
                return result
            remaining = deadline - loop.time()
            if retry_after + _MIN_ATTEMPT_SECONDS > remaining:
                return Failure(result.cause, result.detail + f"; no retry: {retry_after:.3f}s wait does not fit "
                               f"the {remaining * 1000:.0f} ms left")
            if retry_after > 0:
                await asyncio.sleep(retry_after)

    async def _attempt(self, url: str, data: bytes, api: str, remaining: float) -> tuple[Any | Failure, float | None]:
        """One HTTP exchange: (answer or failure, seconds to wait before a retry, or None for no retry)."""
        retry: float | None = None
        started: float | None = None
        if remaining <= 0:
            failure = Failure(Cause.TIMEOUT, "budget spent before the attempt")
            self._observe(api, started, failure)
            return failure, retry
        headers = _JSON
        if self.credentials is not None:
            header = await self.credentials.header(remaining)
            if isinstance(header, Failure):
                self._observe(api, started, header)
                return header, retry
            headers = {**_JSON, "authorization": header}
        started = time.perf_counter()
        await in_task()  # aiohttp's timeout cancels the current task
        try:
            async with self.session.post(
                url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)
            ) as response:
                raw = await response.read()
                status = response.status
                retry_header = response.headers.get("retry-after")
        except TimeoutError:
            failure = Failure(Cause.TIMEOUT, f"no answer within {remaining * 1000:.0f} ms")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            failure, retry = Failure(Cause.CONNECT, type(exc).__name__), 0.0
        except aiohttp.ClientError as exc:
            failure = Failure(Cause.MALFORMED, f"bad HTTP answer: {type(exc).__name__}")
        else:
            if status == 200:
                try:
                    answer = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    failure = Failure(Cause.MALFORMED, "200 with a body that is not JSON")
                else:
                    self._observe(api, started)
                    return answer, retry
            elif status == 401 and self.credentials is not None:
                # A rotated key or an expired token: drop it and retry once with a fresh one.
                self.credentials.invalidate()
                failure, retry = Failure(Cause.AUTH, f"HTTP 401{_error_message(raw)}"), 0.0
            else:
                failure = Failure(_cause(status), f"HTTP {status}{_error_message(raw)}")
                if status >= 500 or status == 429:
                    retry = _retry_after(retry_header)
        self._observe(api, started, failure)
        return failure, retry

    def _observe(self, api: str, started: float | None, failure: Failure | None = None) -> None:
        """Count the call by result and cause, and time it if a request went out."""
        if started is not None:
            metrics.child(metrics.relationship_call_latency, self.backend).observe(time.perf_counter() - started)
        if failure is None:
            metrics.child(metrics.relationship_calls, self.backend, api, "ok", "ok").inc()
        else:
            metrics.child(metrics.relationship_calls, self.backend, api, "error", failure.cause).inc()


def _cause(status: int) -> Cause:
    if status == 429:
        return Cause.THROTTLED
    return Cause.STATUS_5XX if status >= 500 else Cause.STATUS_4XX


def _retry_after(value: str | None) -> float:
    """Seconds to wait; only the delta-seconds form counts (an HTTP date means 'long', so no retry)."""
    if value is None:
        return 0.0
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return float("inf")


def _error_message(raw: bytes) -> str:
    """OpenFGA's ``{code, message}`` error body, shortened, for the log line."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(body, dict):
        return ""
    code, message = body.get("code"), body.get("message")
    text = ": ".join(str(x) for x in (code, message) if isinstance(x, (str, int)) and x != "")
    return f" ({text[:200]})" if text else ""
