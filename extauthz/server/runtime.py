"""Everything built from one loaded policy, swapped as a whole on reload.

A request takes the current :class:`Runtime` once and finishes on it, so a
reload never mixes two policies within one decision.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import structlog

from extauthz.core.authorizer import Authorizer
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.observability import metrics
from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import load_policy
from extauthz.policy.model import Policy

log = structlog.get_logger("extauthz.runtime")


class Runtime:
    def __init__(self, policy: Policy, verifier: Verifier, authorizer: Authorizer) -> None:
        self.policy = policy
        self.verifier = verifier
        self.authorizer = authorizer

    @classmethod
    async def build(cls, policy: Policy, http: httpx.AsyncClient) -> Runtime:
        cache = TokenCache(policy.server.token_cache_size, policy.server.token_cache_ttl_seconds)
        verifier = Verifier(policy.providers, http, cache, metrics.record_jwks_fetch)
        await verifier.start()
        from extauthz.relationships import build_resolver

        return cls(policy, verifier, Authorizer(policy, verifier, build_resolver(policy, http)))

    @property
    def ready(self) -> bool:
        return self.verifier.ready

    async def close(self) -> None:
        await self.verifier.close()


class Sidecar:
    """Holds the current runtime and replaces it atomically when the policy file changes."""

    def __init__(self, path: Path, http: httpx.AsyncClient, runtime: Runtime) -> None:
        self.path = path
        self.http = http
        self.runtime = runtime
        self._reload_lock = asyncio.Lock()

    @classmethod
    async def start(cls, path: Path) -> Sidecar:
        policy = load_policy(path)
        http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=32))
        sidecar = cls(path, http, await Runtime.build(policy, http))
        metrics.policy_info.labels(policy.digest).set(1)
        log.info("policy_loaded", file=str(path), digest=policy.digest, proxies=[p.name for p in policy.proxies])
        return sidecar

    def authorizer(self) -> Authorizer:
        return self.runtime.authorizer

    async def reload(self) -> bool:
        """Load, validate and swap; a broken policy keeps the running one."""
        async with self._reload_lock:
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
            except PolicyError as exc:
                metrics.reloads.labels("error").inc()
                log.error("policy_reload_failed", file=str(self.path), errors=[str(i) for i in exc.issues],
                          keeping_digest=self.runtime.policy.digest)
                return False
            if policy.digest == self.runtime.policy.digest:
                return True
            fresh = await Runtime.build(policy, self.http)
            old, self.runtime = self.runtime, fresh
            metrics.policy_info.clear()
            metrics.policy_info.labels(policy.digest).set(1)
            metrics.reloads.labels("ok").inc()
            log.info("policy_reloaded", file=str(self.path), digest=policy.digest, previous=old.policy.digest)
            # In-flight requests hold the old runtime; close it once they are done.
            asyncio.get_running_loop().call_later(30, lambda: asyncio.ensure_future(old.close()))
            return True

    async def close(self) -> None:
        await self.runtime.close()
        await self.http.aclose()
