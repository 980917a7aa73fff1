"""Bearer credentials for relationship backends: a mounted preshared key, or OIDC client credentials.

Neither value ever reaches a log line. The preshared key is re-read when its
file changes (a rotated Kubernetes Secret), checked at most once a second. An
OIDC access token is fetched once, shared by every concurrent check, renewed in
the background before it expires, and dropped when the backend answers 401 so
the next attempt fetches a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson
import structlog

from extauthz.eager import in_task
from extauthz.policy.model import BackendAuth
from extauthz.relationships.base import Cause, Failure

log = structlog.get_logger("extauthz.relationships")

_FILE_RECHECK_SECONDS = 1.0
_RENEW_BEFORE_SECONDS = 60.0
_FAILED_BACKOFF_SECONDS = 1.0


class Credentials(Protocol):
    async def header(self, budget: float) -> str | Failure:
        """The ``Authorization`` header value, within ``budget`` seconds."""
        ...

    def invalidate(self) -> None:
        """The backend rejected the current credential (401)."""
        ...


class PresharedKey:
    """``Authorization: Bearer <file content>`` from a mounted secret file."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._value = ""
        self._mtime = -1.0
        self._checked = float("-inf")

    async def header(self, budget: float) -> str | Failure:
        now = time.monotonic()
        if now - self._checked >= _FILE_RECHECK_SECONDS:
            self._checked = now
            self._reload()
        if not self._value:
            return Failure(Cause.AUTH, f"preshared key file {self._path} is missing or empty")
        return self._value

    def _reload(self) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime != self._mtime:
                key = self._path.read_text().strip()
                self._value = f"Bearer {key}" if key else ""
                self._mtime = mtime
        except OSError as exc:
            self._value = ""
            log.error("relationship_credentials_unreadable", file=str(self._path), error=exc.strerror)

    def invalidate(self) -> None:
        self._checked = float("-inf")  # re-read the file on the next call


class ClientCredentials:
    """OAuth 2.0 client credentials grant (RFC 6749 §4.4) against ``tokenUrl``."""

    def __init__(self, auth: BackendAuth, session: aiohttp.ClientSession) -> None:
        self._auth = auth
        self._session = session
        self._token = ""
        self._expires = 0.0
        self._fetching: asyncio.Task[str | Failure] | None = None
        self._failed: tuple[float, Failure] | None = None

    async def header(self, budget: float) -> str | Failure:
        now = time.monotonic()
        if self._token and now < self._expires:
            if self._expires - now < _RENEW_BEFORE_SECONDS:
                self._start_fetch()  # renew in the background; this call still uses the current token
            return f"Bearer {self._token}"
        if self._failed is not None and now < self._failed[0]:
            return self._failed[1]  # the token endpoint just failed: do not hammer it once per check
        task = self._start_fetch()
        await in_task()  # the timeout cancels the current task
        try:
            async with asyncio.timeout(budget):
                result = await asyncio.shield(task)
        except TimeoutError:
            return Failure(Cause.AUTH, "token endpoint did not answer within the budget")
        return result if isinstance(result, Failure) else f"Bearer {result}"

    def invalidate(self) -> None:
        self._token = ""
        self._expires = 0.0

    def _start_fetch(self) -> asyncio.Task[str | Failure]:
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())
        return self._fetching

    async def _fetch(self) -> str | Failure:
        result = await self._request()
        self._failed = (time.monotonic() + _FAILED_BACKOFF_SECONDS, result) if isinstance(result, Failure) else None
        return result

    async def _request(self) -> str | Failure:
        auth = self._auth
        try:
            secret = Path(auth.client_secret_file).read_text().strip()
        except OSError as exc:
            return Failure(Cause.AUTH, f"client secret file unreadable: {exc.strerror}")
        form = {"grant_type": "client_credentials", "client_id": auth.client_id, "client_secret": secret}
        if auth.audience:
            form["audience"] = auth.audience
        try:
            async with self._session.post(
                auth.token_url, data=form, timeout=aiohttp.ClientTimeout(total=5),
                headers={"accept": "application/json"},
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = Failure(Cause.AUTH, f"token endpoint unreachable: {type(exc).__name__}")
            log.error("relationship_token_failed", token_url=auth.token_url, cause=failure.detail)
            return failure
        token, lifetime = _parse_token(raw) if status == 200 else ("", 0.0)
        if not token:
            log.error("relationship_token_failed", token_url=auth.token_url, status=status)
            return Failure(Cause.AUTH, f"token endpoint answered {status} without a usable access_token")
        self._token = token
        self._expires = time.monotonic() + lifetime
        return token

    async def aclose(self) -> None:
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
            with contextlib.suppress(BaseException):  # its outcome no longer matters; only that it has ended
                await self._fetching


def _parse_token(raw: bytes) -> tuple[str, float]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", 0.0
    if not isinstance(body, dict):
        return "", 0.0
    token = body.get("access_token")
    expires_in = body.get("expires_in", 300)
    if not isinstance(token, str) or not token:
        return "", 0.0
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = 300
    return token, float(expires_in)


def credentials(auth: BackendAuth, session: aiohttp.ClientSession) -> PresharedKey | ClientCredentials | None:
    if auth.token_file:
        return PresharedKey(auth.token_file)
    if auth.client_id:
        return ClientCredentials(auth, session)
    return None
