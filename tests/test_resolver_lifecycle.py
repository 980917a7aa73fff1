"""A relationship resolver closes what it opened: on failure while building, and on close with lookups running."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest

from extauthz.policy.loader import parse_policy
from extauthz.relationships import build_resolver
from extauthz.relationships.resolver import Relationships

POLICY = """
providers:
  - {name: idp, issuer: https://idp.test, audiences: [docs], jwks: {keys: []}}
relationships:
  openfga:
    - {name: fga, url: "http://127.0.0.1:9", storeId: 01HZX8M5Q2R7T9V3W4Y6Z8B0CD,
       authorizationModelId: 01HZX8M5Q2R7T9V3W4Y6Z8B0CE}
proxies:
  - name: docs
    providers: [idp]
    rules:
      - effect: allow
        fga: {backend: fga, user: "user:{{sub}}", relation: viewer, object: "doc:1"}
"""


def unclosed_sessions(run: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(run())
        gc.collect()
    return [str(w.message) for w in caught if "Unclosed" in str(w.message)]


def test_a_resolver_that_fails_to_build_closes_its_connection_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = parse_policy(POLICY)

    def refuse(self: Relationships, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cannot build")

    monkeypatch.setattr(Relationships, "__init__", refuse)

    async def run() -> None:
        with pytest.raises(RuntimeError):
            await build_resolver(policy)

    assert unclosed_sessions(run) == []


def test_closing_waits_for_lookups_in_flight() -> None:
    policy = parse_policy(POLICY)

    async def run() -> None:
        resolver = await build_resolver(policy)
        assert isinstance(resolver, Relationships)
        started = asyncio.Event()

        async def lookup() -> None:
            started.set()
            await asyncio.sleep(60)

        task = asyncio.create_task(lookup())
        resolver._tasks.add(task)
        await started.wait()
        await resolver.aclose()
        assert task.done() and task.cancelled()

    assert unclosed_sessions(run) == []
