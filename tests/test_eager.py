"""Coroutines run at once from protocol callbacks, and the step into a task that timeouts need."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from extauthz.eager import in_task, run_eagerly


async def from_a_callback(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """``run_eagerly`` as a protocol callback calls it: from the loop, inside no task."""
    done: asyncio.Future[asyncio.Task[None] | None] = asyncio.get_running_loop().create_future()

    def callback() -> None:
        try:
            done.set_result(run_eagerly(coroutine))
        except BaseException as exc:
            done.set_exception(exc)

    asyncio.get_running_loop().call_soon(callback)
    return await done


def test_a_coroutine_that_never_waits_runs_to_its_end_at_once_without_a_task() -> None:
    seen: list[object] = []

    async def quick() -> None:
        seen.append(asyncio.current_task())

    async def main() -> None:
        assert await from_a_callback(quick()) is None
        assert seen == [None]  # ran right here, inside no task

    asyncio.run(main())


def test_a_coroutine_that_waits_goes_on_in_a_task_and_its_timeout_cancels_that_task() -> None:
    seen: list[str] = []

    async def needs_a_task(seconds: float) -> None:
        await in_task()
        seen.append("in a task" if asyncio.current_task() is not None else "outside")
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(seconds)
            seen.append("finished")
        except TimeoutError:
            seen.append("timed out")

    async def main() -> None:
        for seconds in (0.0, 1.0):
            task = await from_a_callback(needs_a_task(seconds))
            assert task is not None
            await task

    asyncio.run(main())
    assert seen == ["in a task", "finished", "in a task", "timed out"]


def test_without_the_step_into_a_task_a_timeout_refuses_to_run() -> None:
    """Why in_task exists: this is how a Redis lookup failed every check that reached it."""

    async def bare() -> None:
        async with asyncio.timeout(1):
            await asyncio.sleep(0)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="inside a task"):
            await from_a_callback(bare())

    asyncio.run(main())


def test_a_cancelled_task_cancels_the_coroutine_it_took_over() -> None:
    seen: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = await from_a_callback(waits())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"]
