"""Review h280: the leak tracker's task factory on a loop that starts tasks
eagerly (``asyncio.eager_task_factory``, Python 3.12+).

With a leak guard on (``--safepool-leaks``, the ``safepool_leak_check``
fixture, ``assert_no_leaks``) the tracker wraps the loop's task factory
(``safepool/testing/tracker.py``, ``_Tracker._watch_tasks``): tasks are
still started eagerly (the wrapper calls the eager factory), so asyncpg's
pool still reports an unmanaged open transaction inside ``release()``,
before the callbacks already queued. safepool asks the loop whether it
starts tasks eagerly (``_internals.starts_tasks_eagerly``), which
recognises the eager factory itself only, not the tracker's
``functools.partial`` around it: it then defers the report with
``call_soon``, after those callbacks, as on a default loop. The same
program orders its events differently on the two pools once a leak guard
is on (and alike without one: tests/compat/test_eager_tasks.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool.testing import assert_no_leaks

pytestmark = pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")


async def _events_of_a_lease_left_in_transaction(pool: Any) -> list[str]:
    """The loop's exception handler's messages and a callback queued just
    before the release, in the order they came."""
    events: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: events.append(str(context["message"]).split(" <")[0]))
    try:
        con = await pool.acquire()
        await con.execute("BEGIN")
        await con.execute("SELECT 1")
        loop.call_soon(events.append, "callback queued before the release")
        await pool.release(con)
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    return events


def _under_a_leak_guard(pg_dsn: str, create_pool: Callable[..., Awaitable[Any]]) -> list[str]:
    """The lease on ``create_pool``'s pool, on an eager loop on which a
    leak guard watches a safepool pool (so its tracker's task factory wraps
    the eager one, for both pools alike)."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        watched = await safepool.create_pool(pg_dsn, min_size=0, max_size=1)
        pool = await create_pool(pg_dsn, min_size=1, max_size=1)
        try:
            async with assert_no_leaks(watched):
                assert loop.get_task_factory() is not asyncio.eager_task_factory  # type: ignore[attr-defined]
                return await _events_of_a_lease_left_in_transaction(pool)
        finally:
            await pool.close()
            await watched.close()

    with asyncio.Runner() as runner:
        return runner.run(scenario())


def test_open_transaction_report_order_with_a_leak_guard_on_an_eager_loop(pg_dsn: str) -> None:
    outcomes = {
        name: _under_a_leak_guard(pg_dsn, factory)
        for name, factory in (("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool))
    }
    assert outcomes["asyncpg"] == [
        "Resetting connection with an active transaction",
        "callback queued before the release",
    ]
    assert outcomes["safepool"] == outcomes["asyncpg"]
