"""Review h261: a ``ContextVar`` set by the ``init=`` hook (or a ``connect=``
callback) is not visible to the task whose acquire opened the connection.

asyncpg's pool connects in the acquiring task itself: ``init=`` (and
``connect=``) run there, so a context variable they set (a "current
connection" or tenant marker, a tracing span made current by an
instrumented query) is set in that task's context, and the code inside
``async with pool.acquire()`` sees it. safepool opens the connection in a
pool task (``Runner.spawn(self.connect_slot(slot))``, safepool/_runner.py:239),
whose context is a copy of the acquirer's: the hook reads the acquirer's
values (both pools agree there) but what it sets stays in the pool task's
copy, and the acquirer sees the old value. docs/migration.md does not list
it. ``connect=`` needs asyncpg 0.30+. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import skip_before_asyncpg

pytestmark = pytest.mark.asyncio

CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("h261_current", default="unset")


async def _init(con: Any) -> None:
    CURRENT.set(f"init saw {CURRENT.get()}")


async def _seen_by_acquirer(factory: Any, dsn: str, **hooks: Any) -> list[str]:
    pool = await asyncio.wait_for(factory(dsn, min_size=0, max_size=2, **hooks), 10)
    seen: list[str] = []
    try:
        async def request() -> None:
            CURRENT.set("request")
            async with pool.acquire(timeout=10) as con:  # no idle connection: this acquire connects
                seen.append(CURRENT.get())
                await con.fetchval("SELECT 1")

        await asyncio.wait_for(asyncio.create_task(request()), 10)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    return seen


async def test_asyncpg_init_hook_sets_the_acquirers_context(pg_dsn: str) -> None:
    assert await _seen_by_acquirer(asyncpg.create_pool, pg_dsn, init=_init) == ["init saw request"]


@pytest.mark.xfail(strict=True, reason="h261: init= runs in a pool task (safepool/_runner.py:239); the ContextVar it sets does not reach the acquirer, as it does on asyncpg's pool")
async def test_safepool_init_hook_sets_the_acquirers_context(pg_dsn: str) -> None:
    assert await _seen_by_acquirer(safepool.create_pool, pg_dsn, init=_init) == ["init saw request"]


async def _connect(*args: Any, **kwargs: Any) -> Any:
    CURRENT.set(f"connect saw {CURRENT.get()}")
    return await asyncpg.connect(*args, **kwargs)


async def test_asyncpg_connect_callback_sets_the_acquirers_context(pg_dsn: str) -> None:
    skip_before_asyncpg((0, 30), "create_pool(connect=)")
    assert await _seen_by_acquirer(asyncpg.create_pool, pg_dsn, connect=_connect) == ["connect saw request"]


@pytest.mark.xfail(strict=True, reason="h261: connect= runs in a pool task (safepool/_runner.py:239); the ContextVar it sets does not reach the acquirer, as it does on asyncpg's pool")
async def test_safepool_connect_callback_sets_the_acquirers_context(pg_dsn: str) -> None:
    skip_before_asyncpg((0, 30), "create_pool(connect=)")
    assert await _seen_by_acquirer(safepool.create_pool, pg_dsn, connect=_connect) == ["connect saw request"]
