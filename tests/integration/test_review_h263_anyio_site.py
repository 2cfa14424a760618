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

from tests._util import leases_seen_in_task_group

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


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


async def test_anyio_task_group_shortcut_is_named_by_the_pool_method_as_its_site(pools: Any) -> None:
    """With site caps on, the site of ``tg.start_soon(pool.fetchval, ...)``
    is the pool method (as under ``asyncio.gather``), not anyio's wrapper."""
    pool = await pools(max_size=2, max_site_share=1.0)
    seen = await leases_seen_in_task_group(pool, lambda group: group.start_soon(pool.fetchval, "SELECT pg_sleep(0.3)"))
    assert [lease.site for lease in seen] == ["safepool.pool.Pool.fetchval"]


async def test_anyio_task_of_the_applications_own_is_reported_at_its_line(pools: Any) -> None:
    """A coroutine of the application's that an anyio task group runs is
    named by its own line, and anyio's frames are not in the stack."""
    pool = await pools(max_size=2, capture_stack=True, max_site_share=1.0)

    async def handler() -> None:
        async with pool.acquire() as con:  # the acquire site
            await con.execute("SELECT pg_sleep(0.3)")

    seen = await leases_seen_in_task_group(pool, lambda group: group.start_soon(handler))
    (lease,) = seen
    assert lease.acquired_at.endswith("in handler"), lease.acquired_at
    assert "_run_coro" not in (lease.stack or "") and "/anyio/" not in (lease.stack or ""), lease.stack
    assert lease.site is not None and lease.site.endswith("handler")
