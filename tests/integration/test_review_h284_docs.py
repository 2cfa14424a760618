"""Helper 284: do README.md, docs/leases.md, docs/backpressure.md and the
health and stats sections of docs/metrics.md tell the truth? Each claim
that a run contradicts is pinned here as a strict xfail asserting what the
doc says (the report lists the claims that held and the ones merely out of
date).
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

import safepool


def _codes(report: safepool.HealthReport) -> list[str]:
    return [reason.code for reason in report.reasons]


async def _pool_with_a_failed_connect(pg_dsn: str) -> tuple[safepool.Pool, safepool.ManualClock]:
    """A pool on a manual clock whose one connect since its start failed (the
    server answered: no such database); it then holds its min_size, so it
    tries no other connect. The caller terminates it."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2, clock=clock)
    try:
        held = await pool.acquire()
        pool.set_connect_args(pg_dsn, database="h284_no_such_database")
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await pool.acquire()
        await pool.release(held)
    except BaseException:
        pool.terminate()
        raise
    return pool, clock


@pytest.mark.asyncio
async def test_a_connect_failure_inside_the_window_is_reported_by_a_second_check_too(pg_dsn: str) -> None:
    pool, clock = await _pool_with_a_failed_connect(pg_dsn)
    try:
        first = await pool.health(probe=False)
        assert "connect_errors" in _codes(first), first
        clock.advance(30.0)
        await asyncio.sleep(0)
        stats = pool.stats()
        # The failure is 30 s old, within the default 60 s window, and it is
        # the only connect since: nothing else moved.
        assert stats.connect_errors == 1 and stats.last_connect_failure_age == 30.0
        second = await pool.health(probe=False)
        assert "connect_errors" in _codes(second), second
    finally:
        pool.terminate()


@pytest.mark.asyncio
async def test_a_connect_failure_before_the_window_is_not_reported_by_a_second_check(pg_dsn: str) -> None:
    """The counterpart: the same failure 61 s old is outside the 60 s window."""
    pool, clock = await _pool_with_a_failed_connect(pg_dsn)
    try:
        assert "connect_errors" in _codes(await pool.health(probe=False))
        clock.advance(61.0)
        await asyncio.sleep(0)
        assert "connect_errors" not in _codes(await pool.health(probe=False))
    finally:
        pool.terminate()


@pytest.mark.realtime
@pytest.mark.asyncio
async def test_start_up_connects_that_failed_are_retried_up_to_min_size(pg_dsn: str) -> None:
    """docs/backpressure.md: the start-up connects that failed are retried
    in the background up to ``min_size`` (the doc said "retried", and a
    pool with ``init_size`` above ``min_size`` stays at ``min_size``: h284)."""
    role = f"h284_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        # The server has one slot for the role at start-up: creation gets the
        # first connection, the two others fail (SQLSTATE 53300).
        await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        pool = await safepool.create_pool(pg_dsn, user=role, init_size=3, min_size=2, max_size=3)
        try:
            assert pool.get_size() == 1 and pool.stats().connect_errors == 2
            await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 10")
            # Retried in the background (a backoff of 1, then 2 s, as the
            # min_size upkeep's): within 4 s the pool holds min_size, and
            # no more (init_size's third is not opened again).
            for _ in range(40):
                if pool.get_size() == 2:
                    break
                await asyncio.sleep(0.1)
            assert pool.get_size() == 2, pool.stats()
        finally:
            pool.terminate()
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        for _ in range(50):
            if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
                break
            await asyncio.sleep(0.05)
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
