"""Watch the mounted policy file and hot-reload it, the way Kubernetes updates it.

Kubelet never edits a ConfigMap file in place. The mounted ``policy.yaml`` is a
symlink to ``..data/policy.yaml``; ``..data`` is a symlink to a timestamped
directory (``..2024_05_01_12_00_00.123456789``). An update writes a whole new
timestamped directory, points a temporary symlink at it and renames that over
``..data`` (one atomic rename), then deletes the old directory. So:

* inotify on the file sees nothing useful (the watched inode never changes, it is
  replaced), and watching the directory means handling symlink churn; polling is
  simpler and survives every variant (subPath aside, which kubelet never updates);
* a read through ``policy.yaml`` always yields one whole version, old or new;
* what identifies a version is the *resolved* target, its inode, size and mtime,
  and in the end its content: kubelet also swaps ``..data`` when another key of
  the same ConfigMap changes, which must not count as a new policy.

Every ``interval`` the watcher stats the resolved target (cheap); when that
changed it reads the file and hashes it with the loader's digest; when the digest
differs from the running policy it asks the sidecar to reload. A broken version is
reported once and then left alone until the file changes again; a version whose
signing keys could not be fetched is retried with backoff. When the file goes back
to the running content (a rollback), the failure is cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("extauthz.reload")

DEFAULT_INTERVAL_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class FileVersion:
    """The identity of what ``path`` points at now; any change is worth a look at the content."""

    target: str
    device: int
    inode: int
    size: int
    mtime_ns: int


class ReloadOutcome(StrEnum):
    RELOADED = "reloaded"
    UNCHANGED = "unchanged"
    INVALID = "invalid"
    """The new file is broken: retrying before it changes again is pointless."""
    UNAVAILABLE = "unavailable"
    """The new policy is valid but its signing keys could not be loaded: worth retrying."""

    @property
    def ok(self) -> bool:
        return self in (ReloadOutcome.RELOADED, ReloadOutcome.UNCHANGED)


@dataclass(frozen=True)
class ReloadReport:
    """The last reload attempt that changed something or failed, for /readyz and the admin service."""

    outcome: ReloadOutcome
    at: str
    digest: str
    errors: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"result": self.outcome.value, "at": self.at, "digest": self.digest or None,
                "errors": list(self.errors)}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_version(path: Path) -> FileVersion | None:
    """None while the file is missing (e.g. a dangling symlink): never a reason to drop the policy."""
    try:
        st = os.stat(path)  # follows the whole symlink chain
    except OSError:
        return None
    return FileVersion(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def content_digest(path: Path) -> str | None:
    """The same digest the loader gives a policy (sha256, 16 hex digits)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


class PolicyWatcher:
    """Polls ``path`` and calls ``reload`` when the content differs from what is running."""

    def __init__(
        self,
        path: Path,
        reload: Callable[[], Awaitable[ReloadOutcome]],
        running_digest: Callable[[], str],
        interval: float = DEFAULT_INTERVAL_SECONDS,
        name: str = "policy-watcher",
    ) -> None:
        self.path = path
        self.name = name
        self._reload = reload
        self._running_digest = running_digest
        self.interval = interval
        self._seen = file_version(path)
        self._refused_digest: str | None = None
        self._retry_delay = 0.0
        self._retry_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():  # one polling task at a time, held until stop()
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        log.info("policy_watch_started", file=str(self.path), interval_seconds=self.interval, watcher=self.name)
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception as exc:  # the watcher must outlive any one bad poll
                log.exception("policy_watch_failed", file=str(self.path), error=f"{type(exc).__name__}: {exc}")

    async def poll(self) -> ReloadOutcome | None:
        """One look at the file; returns the reload outcome when a reload was attempted."""
        loop = asyncio.get_running_loop()
        version = await asyncio.to_thread(file_version, self.path)
        retry_due = self._retry_at is not None and loop.time() >= self._retry_at
        if version is None or (version == self._seen and not retry_due):
            return None
        # Remember the version *before* reading: if the file is swapped again while
        # we read or reload, the next poll sees a new version and looks again.
        self._seen = version
        digest = await asyncio.to_thread(content_digest, self.path)
        if digest is None:
            return None
        if digest == self._running_digest():
            # Back to what runs (e.g. a broken ConfigMap rolled back): a reported failure is
            # cleared through the sidecar, so its status and gauge say the file is in sync.
            recovered = self._refused_digest is not None
            self._forget_failure()
            return await self._reload() if recovered else None
        if digest == self._refused_digest and not retry_due:
            return None  # the same broken content, e.g. touched or re-linked: already reported
        outcome = await self._reload()
        if outcome.ok:
            self._forget_failure()
        elif outcome is ReloadOutcome.INVALID:
            self._refused_digest, self._retry_at = digest, None
        else:  # UNAVAILABLE: the IdP may come back; retry 2 s, 4 s, ... up to a minute
            self._refused_digest = digest
            self._retry_delay = min(MAX_RETRY_SECONDS, max(2.0, self._retry_delay * 2))
            self._retry_at = loop.time() + self._retry_delay
        return outcome

    def recheck(self) -> None:
        """Read the file at the next poll even if it did not change (what runs was dropped: load it again)."""
        self._seen = None

    def _forget_failure(self) -> None:
        self._refused_digest, self._retry_at, self._retry_delay = None, None, 0.0
