"""Review h266: the site of a pool shortcut run through an anyio
``BlockingPortal`` names anyio's frame, not the pool method.

034bbcf made anyio's frames the loop's side: a task whose top is anyio's
wrapper (``TaskHandle._run_coro``) is named by "the coroutine the wrapper
runs". ``_sites.caller_site`` (``safepool/_sites.py:72``) takes the frame
right inside the task's top (``inner``) for that, which is only right when
the wrapper runs the pool method directly. A ``BlockingPortal`` (anyio's
way to call into the loop from a worker thread: ``portal.call(pool.fetchval,
...)``) runs the function inside a second anyio coroutine of its own
(``BlockingPortal._call_func``, under ``_run_coro``): the site is
``anyio.from_thread.BlockingPortal._call_func``, the same for every pool
method and every program, where ``_stack._inside`` (the lease's
``acquired_at``) rightly names ``fetchval``. With ``max_site_share`` every
portal call shares one site's cap, and the ``safepool_site_connections``
label names anyio.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

from tests._util import leases_seen_in_task_group

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


async def test_portal_call_of_a_pool_shortcut_is_named_by_the_pool_method(pools: Any) -> None:
    pool = await pools(max_size=2, capture_stack=True, max_site_share=1.0)
    async with anyio.from_thread.BlockingPortal() as portal:

        def in_thread() -> Any:
            return portal.call(pool.fetchval, "SELECT pg_sleep(0.3)")

        seen = await leases_seen_in_task_group(pool, lambda group: group.start_soon(anyio.to_thread.run_sync, in_thread))
    (lease,) = seen
    assert lease.acquired_at.endswith("in fetchval"), lease.acquired_at  # (the stack is right)
    assert lease.site == "safepool.pool.Pool.fetchval", lease.site


async def test_control_run_coroutine_threadsafe_is_named_by_the_pool_method(pools: Any) -> None:
    """The control: the same call from a thread through asyncio's own
    ``run_coroutine_threadsafe`` is named by the pool method."""
    pool = await pools(max_size=2, capture_stack=True, max_site_share=1.0)
    loop = asyncio.get_running_loop()

    def in_thread() -> Any:
        return asyncio.run_coroutine_threadsafe(pool.fetchval("SELECT pg_sleep(0.3)"), loop).result(10)

    seen = await leases_seen_in_task_group(pool, lambda group: group.start_soon(anyio.to_thread.run_sync, in_thread))
    (lease,) = seen
    assert lease.site == "safepool.pool.Pool.fetchval", lease.site
