"""Coroutines run at once from protocol callbacks, and the one step back into a task some code needs.

The servers answer from ``data_received``: a Check with a cached token and no
relationship lookup never waits, so running it right there, up to its end,
saves a task and a turn of the loop per request (:func:`run_eagerly`). Only a
Check that does wait becomes a task, from the point where it waited.

Until then it runs outside any task, and some asyncio code refuses that:
``asyncio.timeout`` and the HTTP clients' timeouts need the current task, to
cancel it. Such code calls :func:`in_task` first; outside a task, that hands
the rest of the coroutine to a task (one turn of the loop later) before going on.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def run_eagerly(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coroutine`` now, up to its first wait; only one that waits becomes a task (returned).

    An exception it raises before waiting propagates to the caller, as a task's
    would to whoever awaits it.
    """
    result = run_for_value(coroutine)
    return result if isinstance(result, asyncio.Task) else None


def run_for_value(coroutine: Coroutine[Any, Any, T]) -> T | asyncio.Task[T]:
    """:func:`run_eagerly` for a coroutine whose value is wanted: the value if it ended without waiting, else
    the task that goes on from its first wait (``T`` must not itself be a task)."""
    try:
        waiting_for = coroutine.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    return asyncio.get_running_loop().create_task(_resumed(coroutine, waiting_for))


@types.coroutine
def _resumed(started: Coroutine[Any, Any, T], waiting_for: Any) -> Generator[Any, Any, T]:
    """The rest of a coroutine already run up to its first wait, driven as ``await`` would drive it.

    What the started coroutine waits for is handed to the task running this
    one; the task's answer (a value, or an exception such as a cancellation)
    goes back in, until the coroutine returns its value.
    """
    while True:
        try:
            answer = yield waiting_for
        except BaseException as exc:  # noqa: BLE001 - relayed, not handled: the coroutine decides
            try:
                waiting_for = started.throw(exc)
            except StopIteration as done:
                value: T = done.value
                return value
        else:
            try:
                waiting_for = started.send(answer)
            except StopIteration as done:
                value = done.value
                return value


async def in_task() -> None:
    """Go on inside a task: call it before anything that needs ``asyncio.current_task()``."""
    if asyncio.current_task() is None:
        await _next_turn()


@types.coroutine
def _next_turn() -> Generator[None, None, None]:
    # A bare yield: run_eagerly's task takes over the coroutine, and asyncio runs its next step on the next turn.
    yield
