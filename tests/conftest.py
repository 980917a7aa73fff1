"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, any_redis

# --- relationships (issue 4) ---------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis (the machine's, or one started for the session); fails, never skips, without one."""
    with any_redis() as server:
        yield server
