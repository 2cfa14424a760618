"""Review h266: an ``init=`` hook that keeps its connection in a context
variable (a "current connection" marker) makes the pool reclaim a lost
lease's connection that a prepared statement still refers to.

The reclaimer reclaims a connection whose proxy was garbage collected only
when nothing outside the pool refers to it (``Reclaimer.referred_to``:
its reference count against ``holder.base_refs``, "a running query's
coroutine, a transaction, cursor or prepared statement"). ``base_refs`` is
measured in the connect's pool task (``Runner.connect_slot``,
``safepool/_runner.py:811``), while that task's context still holds the
value ``init=`` set, and, since fbe4e93, ``holder.init_context``
(``safepool/_runner.py:803``) too. Both references go once the first lease's
task (a request handler) has ended: from then on the count sits one or two
below the baseline, and a prepared statement of a later, lost lease no
longer shows: the connection is reclaimed (a leak reported, reset, handed
on) and the statement, still in use, fails with "the underlying connection
has been released back to the pool". With ``min_size=1`` (creation's
connect, in the caller's task, whose context stays) or without the variable
the connection stays leased until the statement is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import warnings
from typing import Any

import pytest

import safepool
from safepool import ManualClock

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]

CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("h266_current_connection", default=None)


async def _init_keeps_it(con: Any) -> None:
    CURRENT.set(con)


async def _init_plain(con: Any) -> None:
    pass


async def _statement_survives_a_lost_proxy(dsn: str, init: Any) -> tuple[int, Any]:
    clock = ManualClock()
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1, clock=clock, init=init)
    try:
        async def handler() -> None:  # the connection's first lease, a short-lived task
            async with pool.acquire() as first:
                await first.fetchval("SELECT 1")

        await asyncio.wait_for(asyncio.ensure_future(handler()), 10)
        gc.collect()
        con = await pool.acquire()  # safepool: ignore (the lost proxy under test)
        statement = await con.prepare("SELECT 1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del con
            gc.collect()  # the proxy is gone; the statement still refers to the connection
            for _ in range(5):
                await asyncio.sleep(0.01)
                clock.advance(3.0)
            await asyncio.sleep(0.05)
            leaks = pool.stats().leaks_detected
        try:
            result: Any = await statement.fetchval()
        except Exception as exc:  # noqa: BLE001 (what the statement got is the finding)
            result = exc
        return leaks, result
    finally:
        pool.terminate()


async def test_control_without_the_variable_the_connection_stays_leased(pg_dsn: str) -> None:
    assert await _statement_survives_a_lost_proxy(pg_dsn, _init_plain) == (0, 1)


async def test_an_init_context_variable_does_not_hide_a_prepared_statement(pg_dsn: str) -> None:
    assert await _statement_survives_a_lost_proxy(pg_dsn, _init_keeps_it) == (0, 1)
