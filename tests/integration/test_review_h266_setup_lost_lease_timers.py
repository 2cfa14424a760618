"""Review h266: a lease that ends while its ``setup=`` hook runs gets its
timers armed anyway, and the pool raises ``InternalStateError`` when they
fall due.

8c21335 moved the arming of the lease's clocks (``lease_timeout``,
``leak_warning_after``) after the ``setup=`` hook (``Leaser.acquire``,
``safepool/_leasing.py:307-311``: ``lease.acquired_at = self.now()`` then
``state.arm_lease(...)``), with no look at whether the lease is still open.
A lease can end during the hook without the hook failing: its connection is
lost (the backend killed, a network reset) while the hook awaits something
else; ``PoolState.connection_lost`` discards the lease (its timers were not
armed yet, so none is dropped). The hook returns, ``acquire()`` arms a
deadline and a warning for the discarded lease (``PoolState.arm_lease``,
``safepool/_state.py:1152``): ``check_invariants`` fails at once ("the
lease deadline queue holds an ended lease"), and when the time comes
``PoolState.advance`` pops it (``_pop_due`` does not look whether the
lease is live) and calls ``_expire_lease`` / ``_move_lease(SUSPECT)`` on a
discarded lease: ``InternalStateError: illegal lease transition discarded
-> expired``, raised in the pool's timer callback. Before 8c21335 the
timers were armed before the hook, and the discard dropped them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.mark.parametrize("which", ["lease_timeout", "leak_warning_after"])
async def test_a_lease_lost_during_setup_arms_no_timer(pools: Any, pg_dsn: str, which: str) -> None:
    clock = safepool.ManualClock()
    entered = asyncio.Event()
    go = asyncio.Event()
    pids: list[int] = []

    async def setup(con: Any) -> None:
        pids.append(con.get_server_pid())
        entered.set()
        await go.wait()  # (something else than the connection: an event, a cache, a lock)

    pool = await pools(min_size=1, max_size=2, setup=setup, clock=clock, **{which: 5.0})
    task = asyncio.ensure_future(pool.acquire())
    await asyncio.wait_for(entered.wait(), 5)
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pids[0])  # the lease's connection is lost
    finally:
        await admin.close()
    await until(lambda: pool.stats().leases_discarded == 1)
    go.set()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    clock.advance(6.0)  # the timers, had they been armed, fall due (raises here: the manual clock runs them)
    pool._state.check_invariants()
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT 1") == 1


async def test_real_clock_no_error_reaches_the_loop(pools: Any, pg_dsn: str) -> None:
    """The same on the loop's clock: the error goes to the loop's exception
    handler from the pool's timer."""
    entered = asyncio.Event()
    go = asyncio.Event()
    pids: list[int] = []

    async def setup(con: Any) -> None:
        pids.append(con.get_server_pid())
        entered.set()
        await go.wait()

    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        pool = await pools(min_size=1, max_size=2, setup=setup, lease_timeout=0.2)
        task = asyncio.ensure_future(pool.acquire())
        await asyncio.wait_for(entered.wait(), 5)
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pids[0])
        finally:
            await admin.close()
        await until(lambda: pool.stats().leases_discarded == 1)
        go.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        await asyncio.sleep(0.5)
        found = [c for c in errors if isinstance(c.get("exception"), safepool._state.InternalStateError)]
        assert not found, f"the pool's timer raised {found[0]['exception']!r}"
    finally:
        loop.set_exception_handler(previous)
