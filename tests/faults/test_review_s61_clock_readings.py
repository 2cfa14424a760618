"""Review s61, the timers at awkward clock readings (helper-185).

The clock-driven tests (every file that uses ``ManualClock``, in
tests/unit, tests/integration and tests/faults) were run with the clock
starting at 1000.1, 12345.678, 1e9 + 0.1, 0.1 and 1023.9 instead of 1000.0, under
a guard that fails an ``advance()`` running more than 10,000 callbacks:
no timer spun and no pool outcome changed (the only failures were tests
that subtract a literal 1000.0 or compare a difference of clock readings
with ``==``). The state core's random walks (tests/unit/test_state_fuzz.py),
run with the check that once a timer has fired and found nothing more to
do the next deadline is later than now, found one timer that does spin,
at any reading: the hedge instant while a connect the pool gave up on is
still being cancelled, with ``max_connecting`` reached by counting it.
Reproduced here through the fault proxy's black hole on a guarded
``ManualClock`` (:class:`GuardedClock`: a timer re-armed for an instant
already past 100 times in a row raises :class:`Spinning` out of
``advance()``, where it never returned). Fixed: ``next_deadline`` counts
the connects given up towards ``max_connecting``, as ``_plan_connects``
does, and arms nothing while they fill it (their end re-plans).
"""

from __future__ import annotations

import asyncio

import pytest

import safepool
from tests._util import until

from ._pg import Cluster
from ._proxy import FaultProxy
from .test_review_s61_connect_timers import HEDGE_AFTER, GuardedClock, connect_starts, until_accepted

pytestmark = [pytest.mark.asyncio]


async def test_the_hedge_timer_does_not_spin_while_an_abandoned_connect_counts_towards_max_connecting(
    running: Cluster, app_name: str
) -> None:
    """Unpaced (asyncpg's way), ``max_size=3``, ``max_connecting=2``, after
    one refused connect (``connect_failures`` is 1: hedging is on). Through
    the black hole: a task with ``timeout=0.05`` starts a connect and times
    out; a task with no timeout takes the connect over. One
    ``clock.advance(1.0)`` then covers: 0.1 s after its start the connect
    taken over is presumed lost and cancelled (an ``Abandon``: its task
    ends only once the loop runs, after ``advance()``), and the taker's own
    connect starts; 0.1 s after that, the hedge instant, the connect given
    up still counts towards ``max_connecting`` (two under way), so no hedge
    may start, and the timer must not be armed for that instant again.

    Expected: ``advance()`` returns, with the taker's connect started at
    the first connect's start + 0.1 s, and nothing else; once the
    cancellation has ended the given-up connect, a hedge may start beside
    the taker's (``max_connecting`` allows it again), and no more. Today ``advance()``
    never returns: the guard's :class:`Spinning` (an ``AssertionError``
    here) instead."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=3, max_connecting=2, clock=clock,
            server_settings={"application_name": app_name},
        )
        taker = None
        try:
            async with proxy.refusing_new_connections():
                with pytest.raises(OSError):
                    await asyncio.wait_for(pool.acquire(), 5)
            assert pool.stats().consecutive_connect_failures == 1
            proxy.blackhole = True
            with pytest.raises(asyncio.TimeoutError):
                first = asyncio.ensure_future(pool.acquire(timeout=0.05))
                await until(lambda: pool.stats().waiting == 1)
                [started] = connect_starts(pool)
                await until_accepted(proxy, 1)
                clock.advance(0.05)
                await first
            taker = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            assert connect_starts(pool) == [started]  # taken over, not lost yet (0.05 s old)
            try:
                clock.advance(1.0)
            except Exception as exc:  # (Spinning: the timer re-armed for the hedge instant for ever)
                raise AssertionError(f"ManualClock.advance(1.0) spun: {exc}") from None
            assert connect_starts(pool) == [started + HEDGE_AFTER]  # the taker's own; the lost one given up
            # Once the cancellation has ended the given-up connect, the hedge
            # (due since started + 0.2) starts beside the taker's: two under way.
            await until(lambda: len(connect_starts(pool)) == 2)
            assert connect_starts(pool) == [started + HEDGE_AFTER, clock.now()]
            assert pool.stats().connecting == 2 and pool.stats().size == 2
            assert not taker.done()
        finally:
            if taker is not None:
                taker.cancel()
            pool.terminate()
