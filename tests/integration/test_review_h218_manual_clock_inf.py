"""`ManualClock.advance(math.inf)` (helper-218, a fresh user's review).

docs/testing.md ("Testing timeouts without waiting") says `advance(seconds)`
"runs every timer due by then"; a test that wants every timer run may well
pass infinity. safepool/_clock.py:124 validates `seconds` with
validate_timeout, which refuses negative and NaN values but takes
infinity: the clock then reads `inf`, and every duration the pool derives
from it is `inf - inf`, NaN. A lease taken after it shows `age=nan,
deadline_in=nan` in `pool.leases()`, its lease timeout fires at the next
`advance(0)` ("lease expired after nans (lease_timeout nans)"), and the
statement after it raises LeaseExpiredError, though no time passed. Fixed:
an advance that would move the clock past MAX_READING (2**32 s, where a
float still holds a microsecond; infinity included) is refused
(ValueError), and so is a start beyond it either way.
"""

from __future__ import annotations

import asyncio
import math

import pytest

import safepool

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize(
    "steps",
    [[math.inf], [1e308], [10**308], [2.0**32], [2.0**31, 2.0**31]],
    ids=["inf", "huge-float", "huge-int", "past-max-reading", "sum-past-max-reading"],
)
async def test_advancing_a_manual_clock_to_infinity_is_refused_and_leases_stay_sane(
    pg_dsn: str, steps: list[float]
) -> None:
    clock = safepool.ManualClock()
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, lease_timeout=30.0, clock=clock) as pool:
        *first, last = steps
        for step in first:
            clock.advance(step)
        before = clock.now()
        with pytest.raises(safepool.PoolValueError, match="where a float no longer holds a microsecond"):
            clock.advance(last)
        assert clock.now() == before and math.isfinite(before)  # (refused whole: no timer ran, no time passed)
        async with pool.acquire() as con:
            [lease] = pool.leases()
            assert not math.isnan(lease.age), lease
            clock.advance(0)  # no time passes
            assert await con.fetchval("SELECT 1") == 1


async def test_a_clock_just_under_its_largest_reading_still_times_a_lease(pg_dsn: str) -> None:
    clock = safepool.ManualClock(start=-(2.0**32))
    clock.advance(2.0**33 - 60)  # (to 2**32 - 60: allowed)
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, lease_timeout=30.0, clock=clock) as pool:
        async with pool.acquire() as con:
            clock.advance(29.999)
            assert await con.fetchval("SELECT 1") == 1
        async with pool.acquire() as con:
            clock.advance(30.0)
            await asyncio.sleep(0)
            with pytest.raises(safepool.LeaseExpiredError):
                await con.fetchval("SELECT 1")


@pytest.mark.parametrize("start", [2.0**32 + 1, -(2.0**32) - 1, 10**400], ids=["above", "below", "huge-int"])
async def test_a_start_beyond_the_largest_reading_is_refused(start: float) -> None:
    with pytest.raises(safepool.PoolValueError):
        safepool.ManualClock(start=start)
