"""Review h263: the acquire site of a pool shortcut run as an anyio task.

docs/leases.md: "The walk stops at the top of the running task: a pool
method run as a task's own coroutine (``asyncio.gather(pool.fetchval(...),
...)``) has no caller on any stack, and the report names that method (``in
fetchval``) with the task's name." Under an anyio task group
(``tg.start_soon(pool.fetchval, ...)``, anyio 4.x's asyncio backend) the
task's top coroutine is anyio's own wrapper (``TaskHandle._run_coro`` in
``anyio/_core/_tasks.py``), not the pool method: ``_stack._walk``
(``safepool/_stack.py:93-112``) classifies only asyncio's and safepool's
files as not the application's (``_kind``, line 47-61), so it keeps anyio's
frame as the application frame, and every report and ``LeaseInfo``
(``acquired_at``, ``stack``) names ``anyio/_core/_tasks.py:... in
_run_coro``: neither the user's code nor the documented ``in fetchval``.
(The pytest plugin drops anyio's frames from its own reports,
``testing/guards.py:171``; the pool's log report and ``pool.leases()`` do not.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.mark.xfail(strict=True, reason=(
    "h263: _stack._kind (safepool/_stack.py:47) takes anyio's task wrapper for application code: a "
    "pool.fetchval run by an anyio task group is reported as acquired in anyio's _run_coro"))
async def test_anyio_task_group_shortcut_is_reported_as_the_pool_method(pools: Any) -> None:
    pool = await pools(max_size=2, capture_stack=True)
    seen: list[tuple[str, str]] = []
    wrapped: list[bool] = []

    async def look() -> None:
        task = asyncio.current_task()
        # (anyio 4.16's asyncio backend runs each task in its own wrapper coroutine; older
        # anyio 4 releases ran the function's coroutine itself, where the report is right.)
        wrapped.append(task is not None and task.get_coro().__qualname__ != look.__qualname__)
        while not pool.leases():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        seen.extend((lease.acquired_at, lease.stack or "") for lease in pool.leases())

    async with anyio.create_task_group() as group:
        group.start_soon(pool.fetchval, "SELECT pg_sleep(0.5)")
        group.start_soon(look)
    if not wrapped[0]:
        pytest.skip("this anyio runs a task's coroutine unwrapped")
    assert seen
    for acquired_at, stack in seen:
        assert "anyio" not in stack, stack
        assert acquired_at.endswith("in fetchval"), acquired_at
