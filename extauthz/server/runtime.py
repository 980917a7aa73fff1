"""Everything built from one loaded policy, swapped as a whole on reload.

A request takes the current :class:`Runtime` once and finishes on it, so a
reload never mixes two policies within one decision.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import structlog

from extauthz.core.authorizer import Authorizer
from extauthz.core.claims import Claims
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.observability import metrics
from extauthz.policy.errors import PolicyError
from extauthz.policy.model import Policy
from extauthz.server.reload import ReloadOutcome, ReloadReport, now
from extauthz.server.shadow import Shadow
from extauthz.server.validation import load_for_serving

log = structlog.get_logger("extauthz.runtime")

_CACHE_HIT = metrics.token_cache.labels("hit")
_CACHE_MISS = metrics.token_cache.labels("miss")


class MeteredTokenCache(TokenCache):
    """The verified-token cache, counting hits and misses for Prometheus."""

    def get(self, key: bytes) -> Claims | None:
        claims = super().get(key)
        (_CACHE_HIT if claims is not None else _CACHE_MISS).inc()
        return claims


def envoy_warnings() -> list[str]:
    """The Envoy configuration warnings this process has logged (each names the setting to add)."""
    from extauthz.core.authorizer import authorization_header
    from extauthz.server.processing import config_warnings

    return config_warnings.said() + (["authorization_header_not_forwarded"] if authorization_header.said else [])


class Runtime:
    def __init__(self, policy: Policy, verifier: Verifier, authorizer: Authorizer) -> None:
        self.policy = policy
        self.verifier = verifier
        self.authorizer = authorizer

    @classmethod
    async def build(cls, policy: Policy, http: httpx.AsyncClient) -> Runtime:
        cache = MeteredTokenCache(policy.server.token_cache_size, policy.server.token_cache_ttl_seconds)
        verifier = Verifier(policy.providers, http, cache, metrics.record_jwks_fetch)
        try:
            await verifier.start()
            from extauthz.relationships import build_resolver

            return cls(policy, verifier, Authorizer(policy, verifier, await build_resolver(policy)))
        except BaseException:  # failed or cancelled half-way: stop the key refreshes already started
            await verifier.close()
            raise

    @property
    def ready(self) -> bool:
        return self.verifier.ready

    def key_ages(self) -> dict[str, float | None]:
        return {name: keyset.age_seconds for name, keyset in self.verifier.keysets.items()}

    def unready_providers(self) -> list[str]:
        return [f"provider {name}: no signing keys ({keyset.last_error or 'not loaded'})"
                for name, keyset in self.verifier.keysets.items() if not keyset.ready]

    async def close(self) -> None:
        await self.verifier.close()
        # Relationship backends' connection pools, Redis client and background lookups.
        await self.authorizer.relationships.aclose()


class RuntimeHolder:
    """Holds the current runtime and replaces it atomically when the policy file changes."""

    def __init__(self, path: Path, http: httpx.AsyncClient, runtime: Runtime) -> None:
        self.path = path
        self.http = http
        self.runtime = runtime
        self._reload_lock = asyncio.Lock()
        self.loaded_at = now()
        self.last_reload: ReloadReport | None = None
        # Runtimes replaced by a reload, closed once the requests they serve are done
        # (or at shutdown); held here so neither the timer nor the task is lost.
        self._retired: dict[Runtime, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Reloads started by reload_soon (SIGHUP), cancelled at shutdown.
        self._reloads: set[asyncio.Task[ReloadOutcome]] = set()
        self._closed = False
        self.shadow = Shadow(http)

    @classmethod
    async def start(cls, path: Path, policy: Policy | None = None) -> RuntimeHolder:
        """Serve ``path``; ``policy`` is that file as just loaded by :func:`load_for_serving`, if it was."""
        if policy is None:
            policy = load_for_serving(path, shape_in_child=True)
        http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=32))
        try:
            sidecar = cls(path, http, await Runtime.build(policy, http))
        except BaseException:
            await http.aclose()
            raise
        metrics.policy_info.labels(policy.digest).set(1)
        log.info("policy_loaded", file=str(path), digest=policy.digest, proxies=[p.name for p in policy.proxies])
        await sidecar.shadow.configure(policy.server.shadow, sidecar.runtime)
        return sidecar

    async def reload_shadow(self) -> ReloadOutcome:
        """The shadow policy's file changed; under the reload lock, so it binds to the runtime that serves."""
        async with self._reload_lock:
            if self._closed:
                return ReloadOutcome.UNCHANGED
            return await self.shadow.reload(self.runtime)

    def watch_shadow(self, interval: float) -> None:
        """Watch the shadow policy's file (when one is configured, now or after a reload) like the policy's."""
        self.shadow.watch(interval, self.reload_shadow)

    def authorizer(self) -> Authorizer:
        return self.runtime.authorizer

    async def reload(self) -> ReloadOutcome:
        """Load, validate fully, build, swap; anything short of a serving runtime keeps the running one.

        "Fully" means: the loader's checks, the server's checks (addresses, TLS
        files, key sources) and the new verifier's keys actually loaded. A valid
        policy whose IdP is unreachable would turn a serving sidecar into one that
        answers 503, so it is refused as ``UNAVAILABLE`` and retried by the watcher.
        """
        async with self._reload_lock:
            if self._closed:
                raise RuntimeError("the sidecar is closed: nothing may be reloaded into it")
            try:
                policy = await asyncio.to_thread(load_for_serving, self.path, shape_in_child=True)
            except PolicyError as exc:
                return self._refused(ReloadOutcome.INVALID, "", [str(i) for i in exc.issues])
            if policy.digest == self.runtime.policy.digest:
                metrics.policy_rejected.set(0)
                if self.last_reload is not None and not self.last_reload.outcome.ok:
                    self.last_reload = ReloadReport(ReloadOutcome.UNCHANGED, now(), policy.digest)
                    log.info("policy_file_in_sync", file=str(self.path), digest=policy.digest,
                             detail="the file is back to the running policy; the earlier failure is cleared")
                return ReloadOutcome.UNCHANGED
            started = time.perf_counter()
            try:
                fresh = await Runtime.build(policy, self.http)
            except Exception as exc:  # noqa: BLE001 - a policy that cannot be built must not take the old one down
                error = f"{self.path}: {type(exc).__name__}: {exc}"
                return self._refused(ReloadOutcome.INVALID, policy.digest, [error])
            if not fresh.ready:
                errors = fresh.unready_providers()
                await fresh.close()
                return self._refused(ReloadOutcome.UNAVAILABLE, policy.digest, errors)
            await self.shadow.configure(policy.server.shadow, fresh)  # the candidate is kept, or follows the file
            old, self.runtime = self.runtime, fresh
            self.loaded_at = now()
            self.last_reload = ReloadReport(ReloadOutcome.RELOADED, self.loaded_at, policy.digest)
            metrics.policy_info.clear()
            metrics.policy_info.labels(policy.digest).set(1)
            metrics.policy_rejected.set(0)
            metrics.reloads.labels("ok").inc()
            log.info("policy_reloaded", file=str(self.path), digest=policy.digest, previous=old.policy.digest,
                     build_ms=round((time.perf_counter() - started) * 1000, 1))
            if policy.server != old.policy.server:
                log.warning("server_settings_need_restart", file=str(self.path),
                            detail="listen addresses, TLS file paths, token cache and drain settings "
                                   "apply at start; the new rules and providers are live")
            # In-flight requests hold the old runtime; close it once they are done.
            grace = max(30.0, policy.server.drain_seconds)
            self._retired[old] = asyncio.get_running_loop().call_later(grace, self._close_retired, old)
            return ReloadOutcome.RELOADED

    def _refused(self, outcome: ReloadOutcome, digest: str, errors: list[str]) -> ReloadOutcome:
        self.last_reload = ReloadReport(outcome, now(), digest, tuple(errors))
        metrics.reloads.labels(outcome.value).inc()
        metrics.policy_rejected.set(1)
        log.error("policy_reload_failed", file=str(self.path), result=outcome.value, errors=errors,
                  rejected_digest=digest or None, keeping_digest=self.runtime.policy.digest)
        return outcome

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: ready once every provider has keys; the body names the policy that serves."""
        runtime = self.runtime
        providers = {
            name: {
                "ready": keyset.ready,
                "keyAgeSeconds": None if keyset.age_seconds is None else round(keyset.age_seconds, 1),
                "lastError": keyset.last_error or None,
            }
            for name, keyset in runtime.verifier.keysets.items()
        }
        body = {
            "ready": runtime.ready,
            "policy": {"digest": runtime.policy.digest, "file": str(self.path), "loadedAt": self.loaded_at},
            "providers": providers,
            "lastReload": self.last_reload.as_json() if self.last_reload else None,
        }
        shadow = self.shadow.status()
        if shadow is not None:
            body["shadow"] = shadow
        warnings = envoy_warnings()
        if warnings:  # an Envoy setting the sidecar needs is missing: said here, not by a 502 per request
            body["envoyWarnings"] = warnings
        return runtime.ready, body

    def reload_soon(self) -> None:
        """Reload in the background (SIGHUP); the task is held here and cancelled by :meth:`close`."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="policy-reload")
        self._reloads.add(task)
        task.add_done_callback(self._task_done)

    def _close_retired(self, old: Runtime) -> None:
        self._retired.pop(old, None)
        task = asyncio.get_running_loop().create_task(old.close(), name="close-retired-runtime")
        self._closing.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A background task ended: let go of it, and log what it failed with (nobody awaits it)."""
        self._reloads.discard(task)
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("background_task_failed", task=task.get_name(), error=f"{type(error).__name__}: {error}")

    async def close(self) -> None:
        """Stop reloading, then close every runtime and the shared client.

        Reloads started by :meth:`reload_soon` are cancelled; any other reload in
        progress is waited for, so no runtime is built after this returns. Runtimes
        a reload replaced are closed now, without waiting for their grace period.
        """
        self._closed = True
        for task in list(self._reloads):
            task.cancel()
        if self._reloads:
            await asyncio.gather(*self._reloads, return_exceptions=True)
        async with self._reload_lock:
            await self.shadow.close()
            for old, timer in list(self._retired.items()):
                timer.cancel()
                self._close_retired(old)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            await self.runtime.close()
            await self.http.aclose()
