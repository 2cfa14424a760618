"""Helper 284: do README.md, docs/leases.md, docs/backpressure.md and the
health and stats sections of docs/metrics.md tell the truth? Each claim
that a run contradicts is pinned here as a strict xfail asserting what the
doc says (the report lists the claims that held and the ones merely out of
date).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import safepool


def _codes(report: safepool.HealthReport) -> list[str]:
    return [reason.code for reason in report.reasons]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "h284: docs/metrics.md:458 and :472 (and check_health()'s docstring) say health() is degraded "
        "(connect_errors) when connects failed within connect_error_window; but within the first window "
        "after a pool's first check, a later check takes that first check as its baseline "
        "(safepool/health.py:375-381, the for/else falling back to runs[0]) and so drops every failure "
        "that came before it, though it lies inside its window: the first check reports it, the next one, "
        "30 s later with a 60 s window, reports ok"
    ),
)
@pytest.mark.asyncio
async def test_a_connect_failure_inside_the_window_is_reported_by_a_second_check_too(pg_dsn: str) -> None:
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2, clock=clock)
    try:
        held = await pool.acquire()
        # The next connect fails (the server answers: no such database); the
        # pool then holds its min_size, so it tries no other connect.
        pool.set_connect_args(pg_dsn, database="h284_no_such_database")
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await pool.acquire()
        await pool.release(held)
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
