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
from typing import Any

import pytest

import safepool

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.mark.xfail(strict=True, reason=(
    "h263: the reset watchdog is armed on the pool's clock (_runner.py:369): a ManualClock.advance(30) "
    "aborts a release's reset in flight, and release() raises ConnectionDoesNotExistError"))
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
