"""On uvloop, on a real PostgreSQL: a lease's leak warning costs the pool one
timer callback. uvloop rounds a timer's delay to the nearest millisecond, so
a deadline in the first half of one ran early; the pool found nothing due and
re-armed, about a hundred times in a busy loop, until the clock ticked."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from safepool.events import LeakSuspected
from tests._util import pool_and_admin

pytestmark = pytest.mark.realtime


async def _warn_once(pg_dsn: str, leak_warning_after: float) -> tuple[int, list[float]]:
    """(the pool's timer callbacks, the held seconds of each leak warning)
    while one lease outlives leak_warning_after."""
    async with pool_and_admin(pg_dsn, leak_warning_after=leak_warning_after) as (pool, _admin):
        runner: Any = pool._runner
        on_timer = runner.on_timer
        calls = 0

        def counting() -> None:
            nonlocal calls
            calls += 1
            on_timer()

        runner.on_timer = counting  # read when the timer is armed, at the acquire
        warned: list[float] = []
        pool.add_event_listener(lambda e: warned.append(e.held_seconds) if isinstance(e, LeakSuspected) else None)
        con = await pool.acquire()
        await asyncio.sleep(leak_warning_after + 0.03)
        await pool.release(con)
        return calls, warned


# 50.4 ms and 51.1 ms: the first half of a millisecond; 50 ms and 37 ms:
# whole milliseconds, which a float sum may put a hair past the tick.
@pytest.mark.parametrize("leak_warning_after", [0.0504, 0.0511, 0.05, 0.037])
def test_a_leak_warning_on_uvloop_takes_one_timer_callback(pg_dsn: str, leak_warning_after: float) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        calls, warned = runner.run(asyncio.wait_for(_warn_once(pg_dsn, leak_warning_after), 10))
    assert len(warned) == 1
    assert warned[0] >= leak_warning_after - 1e-9  # (held is now - acquired_at: a float difference)
    assert calls == 1


def test_a_lifetime_too_long_to_count_in_milliseconds(pg_dsn: str) -> None:
    """``max_lifetime`` (and ``lease_timeout``) of more seconds than a
    float counts in milliseconds: the timer raised OverflowError, so
    create_pool() failed, and a lease_timeout that long left its lease open
    with no timer armed for the pool again."""

    async def serve() -> tuple[float | None, int]:
        async with pool_and_admin(pg_dsn, max_lifetime=1e306, lease_timeout=1e306) as (pool, _admin):
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1
            return pool.options.max_lifetime, pool.stats().in_use

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(asyncio.wait_for(serve(), 10)) == (1e306, 0)
