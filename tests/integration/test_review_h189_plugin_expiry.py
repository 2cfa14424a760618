"""The pytest leak plugin and a leak that `lease_timeout` took back before the
test ended (helper-189, a fresh user's review).

README ("Leak guards in CI") says `pytest --safepool-leaks` fails "each test
that leaves a connection unreleased", and docs/testing.md ("What counts as a
leak") counts a connection "ended by the pool and never released by the
code", because a shutdown (`terminate()`, a close cut short) would otherwise
hide the bug. A lease taken back by `lease_timeout` hides it the same way:
the code kept the connection (here in a module-level cache, so it is never
garbage) and never released it, the pool logged "lease expired" and ended
the lease, and the test passes. A suite whose pool has a lease timeout (the
recommended configuration has 30 s; a `ManualClock` test advances past it
at once) then misses exactly the leaks the timeout is a backstop for.
"""

from __future__ import annotations

import pytest

from tests._util import NESTED_PYTEST_ADDOPTS, PYTESTER_INI

pytest_plugins = ["pytester"]
# The inner suite leaks on purpose.
pytestmark = pytest.mark.safepool_allow_leaks

SAMPLE = '''
import os

import pytest

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]
CACHE = []


async def handler(pool):
    con = await pool.acquire()  # LEAK-EXPIRED
    CACHE.append(con)  # kept, never released: not garbage, so only lease_timeout takes it back
    return await con.fetchval("SELECT 1")


async def test_cached_connection_taken_back_by_lease_timeout():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock) as pool:
        assert await handler(pool) == 1
        clock.advance(30.0)  # the pool takes the connection back
        assert pool.stats().leases_expired == 1
'''


def test_a_leak_taken_back_by_lease_timeout_fails_under_safepool_leaks(
    inline_runs_collected: None, pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFEPOOL_PLUGIN_DSN", pg_dsn)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makepyfile(test_expired=SAMPLE)
    pytester.makeini(PYTESTER_INI)
    result = pytester.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["safepool: 1 connection leaked", "*# LEAK-EXPIRED"])


SIBLINGS = '''
import asyncio
import os

import pytest

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]
CACHE = []


async def test_kept_past_a_per_acquire_lease_timeout():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, clock=clock) as pool:
        CACHE.append(await pool.acquire(lease_timeout=5.0))  # LEAK-PER-ACQUIRE
        clock.advance(5.0)
        assert pool.stats().leases_expired == 1


async def test_released_after_the_take_back_by_its_async_with():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock) as pool:
        with pytest.raises(safepool.LeaseExpiredError):
            async with pool.acquire() as con:
                clock.advance(30.0)
                await con.fetchval("SELECT 1")
        assert pool.stats().leases_expired == 1


async def test_released_after_the_take_back_by_hand():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock) as pool:
        con = await pool.acquire()
        clock.advance(30.0)
        await pool.release(con)  # late: a no-op, but released
        assert pool.stats().leases_expired == 1


@pytest.mark.safepool_allow_leaks
async def test_kept_on_purpose():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock) as pool:
        CACHE.append(await pool.acquire())
        clock.advance(30.0)
        assert pool.stats().leases_expired == 1


@pytest.mark.safepool_allow_leaks  # (the plugin's own guard would report it again)
async def test_the_guard_reports_it_too():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock) as pool:
        with pytest.raises(safepool.testing.LeakError) as caught:
            async with safepool.testing.assert_no_leaks(pool):
                CACHE.append(await pool.acquire())  # LEAK-GUARD
                clock.advance(30.0)
        assert "taken back at its lease_timeout of 30 s" in str(caught.value)
'''


def test_only_a_lease_the_code_never_released_after_its_take_back_is_a_leak(
    inline_runs_collected: None, pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kind's siblings: a per-acquire ``lease_timeout`` kept past it
    fails, with the take-back named; a lease released after its take back
    (an ``async with`` unwinding from the ``LeaseExpiredError``, or a late
    ``release()``: a no-op, but the code did release) passes; so does one
    kept under ``safepool_allow_leaks``; and ``assert_no_leaks`` reports
    it as the plugin does."""
    monkeypatch.setenv("SAFEPOOL_PLUGIN_DSN", pg_dsn)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makepyfile(test_siblings=SIBLINGS)
    pytester.makeini(PYTESTER_INI)
    result = pytester.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=4)
    result.stdout.fnmatch_lines([
        "*FAILED*test_kept_past_a_per_acquire_lease_timeout*",
    ])
    result.stdout.fnmatch_lines([
        "*never released; the pool ended it (taken back at its lease_timeout of 5 s)*",
        "*# LEAK-PER-ACQUIRE",
    ])
