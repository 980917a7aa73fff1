"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.openfga_server import OpenFgaServer, journeys_server
from tests.redis_server import RedisServer, any_redis

# --- relationships (OpenFGA, Redis) ---------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis (the machine's, or one started for the session); fails, never skips, without one."""
    with any_redis() as server:
        yield server


@pytest.fixture(scope="module")
def fga() -> Iterator[OpenFgaServer]:
    """A local OpenFGA server with the journeys model and tuples, one per module that uses it."""
    with journeys_server() as server:
        yield server


@pytest.fixture
def fga_spec_clean(fga: OpenFgaServer) -> Iterator[None]:
    """Each test starts without earlier calls or scripted answers, and every request the client sent
    in it must have matched the published spec (only its shape when the spec is not at hand, see
    tests/openfga_server.py). Modules opt in with ``pytest.mark.usefixtures``."""
    fga.calls.clear()
    fga.script.clear()
    yield
    assert fga.invalid == [], fga.invalid
    fga.script.clear()
