"""Review h263: under ``clock=safepool.ManualClock()``, a test that advances
the clock to expire one lease aborts another lease's healthy release.

docs/testing.md:660: "(The ``reset_timeout`` of a release, asyncpg's
``command_timeout`` and connect ``timeout``, and ``health()``'s
``probe_timeout`` are real seconds, on the event loop's clock.)" Without a
``reset_timeout`` the bound of a release's reset is the reset watchdog's
30 s (``DEFAULT_RESET_TIMEOUT``), and the watchdog runs on the pool's clock:
``Runner.watch_resets`` arms it with ``self.clock.call_at(start +
DEFAULT_RESET_TIMEOUT, ...)`` (``safepool/_runner.py:369``), ``start`` being
the pool clock's reading at the release (``holder.reset_since``,
``safepool/_leasing.py:614``). A ``clock.advance(30)`` made while a release's
reset is on the wire (for a microsecond of real time) aborts it: "a reset
got no answer for 30s; aborting the connection", the release raises
``ConnectionDoesNotExistError`` and the connection is closed, though the
server answered at once. The test only meant to run out another lease's
``lease_timeout``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _runner
from tests._util import sleeping_reset_connection_class, until_in_pg_sleep

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


async def test_advancing_a_manual_clock_does_not_abort_a_release_in_flight(pools: Any) -> None:
    clock = safepool.ManualClock()
    pool = await pools(max_size=2, min_size=2, clock=clock, lease_timeout=30.0)
    releasing = await pool.acquire()  # safepool: ignore (released by the task below)
    stuck = await pool.acquire()  # safepool: ignore (taken back under test)
    await releasing.execute("SELECT 1")  # its release sends the reset query
    release = asyncio.ensure_future(pool.release(releasing))
    await asyncio.sleep(0)  # the release's reset is on the wire
    clock.advance(30.0)  # the stuck lease's lease_timeout: what the test is about
    await asyncio.wait_for(release, 10)  # a healthy release returns
    with pytest.raises(safepool.LeaseExpiredError):
        await stuck.fetchval("SELECT 1")
    assert pool.stats().connections_closed == 0


async def test_a_manual_clock_pools_watchdog_aborts_a_hung_reset_on_real_time(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the fix: the watchdog still bounds a reset the
    server never finishes (a minute of ``pg_sleep``) in a pool on a
    ``ManualClock``, on the loop's real time (its 30 s made 0.3 s here).
    The reset's start is recorded on that clock (``Holder.reset_since``,
    ``IOStampHolder``: the release stamps it with the pool clock's reading,
    which here is not the loop's), and advancing the pool's clock far past
    the bound aborts nothing."""
    monkeypatch.setattr(_runner, "DEFAULT_RESET_TIMEOUT", 0.3)
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, connection_class=sleeping_reset_connection_class(),
        server_settings={"application_name": app_name},
    )
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        await con.fetchval("SELECT 1")  # dirty: the release resets (a minute on the server)
        before = time.monotonic()
        release = asyncio.ensure_future(pool.release(con))
        await asyncio.sleep(0)  # the release's reset is on the wire, watched
        [holder] = pool._runner.slot_holders.values()
        assert holder.reset_since is not None and before <= holder.reset_since <= time.monotonic()
        clock.advance(1000.0)  # the pool's clock: not the watchdog's
        await asyncio.sleep(0.05)
        assert not release.done()
        await until_in_pg_sleep(pg_dsn, pid)
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release, 5)
        assert time.monotonic() - before >= 0.25  # (the loop may run a timer a hair early)
        assert pool._runner.reset_watchdog is None
        # (Not released: its release would reset, a minute on the server.)
        again = await pool.acquire(timeout=5)  # (a manual clock: only the test ends this wait)
        assert again.get_server_pid() != pid
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await admin.close()
        pool.terminate()


async def test_a_reset_begun_while_the_watchdog_is_armed_is_stamped_on_real_time(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second release's reset, begun while the watchdog is already armed
    (no call of ``watch_resets`` for it): its start too is the loop's
    time, not the pool clock's (which a test moved 1000 s on meanwhile),
    and it is aborted its own bound after that start, on real time."""
    monkeypatch.setattr(_runner, "DEFAULT_RESET_TIMEOUT", 0.5)
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=2, max_size=2, clock=clock, connection_class=sleeping_reset_connection_class(),
        server_settings={"application_name": app_name},
    )
    admin = await asyncpg.connect(pg_dsn)
    try:
        first, second = await pool.acquire(), await pool.acquire()
        for con in (first, second):
            await con.fetchval("SELECT 1")  # dirty: each release resets
        release_first = asyncio.ensure_future(pool.release(first))
        await until_in_pg_sleep(pg_dsn, first.get_server_pid())
        assert pool._runner.reset_watchdog is not None
        clock.advance(1000.0)
        before = time.monotonic()
        release_second = asyncio.ensure_future(pool.release(second))
        await asyncio.sleep(0)
        stamps = sorted(h.reset_since for h in pool._runner.slot_holders.values() if h.reset_since is not None)
        assert len(stamps) == 2 and stamps[1] >= before and stamps[1] - stamps[0] < 5.0
        for release in (release_first, release_second):
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
        assert time.monotonic() - before >= 0.45
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await admin.close()
        pool.terminate()
