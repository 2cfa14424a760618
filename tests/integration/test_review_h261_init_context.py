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
copy, and the acquirer saw the old value. Fixed: the values the connect set
are set in the task of the connection's first lease
(``Runner.connect_slot(carry_context=True)``, ``Holder.init_context``).
``connect=`` needs asyncpg 0.30+. Every wait is bounded."""

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


async def test_safepool_init_hook_sets_the_acquirers_context(pg_dsn: str) -> None:
    assert await _seen_by_acquirer(safepool.create_pool, pg_dsn, init=_init) == ["init saw request"]


async def _connect(*args: Any, **kwargs: Any) -> Any:
    CURRENT.set(f"connect saw {CURRENT.get()}")
    return await asyncpg.connect(*args, **kwargs)


async def test_asyncpg_connect_callback_sets_the_acquirers_context(pg_dsn: str) -> None:
    skip_before_asyncpg((0, 30), "create_pool(connect=)")
    assert await _seen_by_acquirer(asyncpg.create_pool, pg_dsn, connect=_connect) == ["connect saw request"]


async def test_safepool_connect_callback_sets_the_acquirers_context(pg_dsn: str) -> None:
    skip_before_asyncpg((0, 30), "create_pool(connect=)")
    assert await _seen_by_acquirer(safepool.create_pool, pg_dsn, connect=_connect) == ["connect saw request"]


FACTORIES = [pytest.param(asyncpg.create_pool, id="asyncpg"), pytest.param(safepool.create_pool, id="safepool")]


async def _counting_init(con: Any) -> None:
    CURRENT.set(f"init {con.get_server_pid()}")


@pytest.mark.parametrize("factory", FACTORIES)
async def test_only_the_first_lease_of_a_connection_gets_what_init_set(pg_dsn: str, factory: Any) -> None:
    """init= runs once per connection: a later lease's task (another task)
    does not see its value; a connection opened again (expire_connections())
    runs it again, in the acquirer's task."""
    pool = await asyncio.wait_for(factory(pg_dsn, min_size=0, max_size=1, init=_counting_init), 10)
    try:
        async def request() -> tuple[str, int]:
            async with pool.acquire(timeout=10) as con:
                return CURRENT.get(), con.get_server_pid()

        first, pid = await asyncio.wait_for(asyncio.create_task(request()), 10)
        assert first == f"init {pid}"
        second, same = await asyncio.wait_for(asyncio.create_task(request()), 10)
        assert (second, same) == ("unset", pid)
        await pool.expire_connections()
        third, new_pid = await asyncio.wait_for(asyncio.create_task(request()), 10)
        assert new_pid != pid and third == f"init {new_pid}"
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("factory", FACTORIES)
async def test_a_waiter_served_by_a_connect_gets_what_init_set(pg_dsn: str, factory: Any) -> None:
    """Two tasks wait while the pool's one connection is leased and then
    lost: the task the reopened connection first serves sees init='s value."""
    pool = await asyncio.wait_for(factory(pg_dsn, min_size=0, max_size=1, init=_counting_init), 10)
    try:
        held = await pool.acquire(timeout=10)
        old_pid = held.get_server_pid()
        CURRENT.set("outside")
        seen: list[tuple[str, int]] = []

        async def request() -> None:
            async with pool.acquire(timeout=10) as con:
                seen.append((CURRENT.get(), con.get_server_pid()))

        tasks = [asyncio.create_task(request()) for _ in range(2)]
        await asyncio.sleep(0)
        held.terminate()  # the connection is gone: the pool opens another
        await pool.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        pids = {pid for _, pid in seen}
        assert len(pids) == 1 and old_pid not in pids
        (new_pid,) = pids
        assert [value for value, _ in seen] == [f"init {new_pid}", "outside"]
    finally:
        await asyncio.wait_for(pool.close(), 10)
