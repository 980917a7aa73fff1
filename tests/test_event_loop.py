"""The sidecar serves on uvloop where it is installed, and on asyncio's own loop when told to."""

from __future__ import annotations

import asyncio

import pytest

from extauthz.server import loop


async def _running_loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_server_loop_is_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop", reason="uvloop is not built for this platform")
    monkeypatch.delenv(loop.ENV, raising=False)
    assert loop.loop_name() == "uvloop"
    assert loop.run(_running_loop_module()).startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(loop.ENV, value)
    assert loop.loop_name() == "asyncio"
    assert loop.run(_running_loop_module()).startswith("asyncio")
