"""The example of docs/testing.md ("Testing timeouts without waiting"), run
against a real PostgreSQL by tests/integration/test_docs_examples.py."""

from __future__ import annotations

import pytest

import safepool


# --8<-- [start:manual_clock]
@pytest.mark.safepool_allow_leaks  # never releasing is the bug under test (--safepool-leaks would report it)
async def test_a_stuck_handler_loses_its_connection_at_the_lease_timeout(dsn: str) -> None:
    clock = safepool.ManualClock()  # time moves only when the test says so
    async with safepool.create_pool(dsn, min_size=1, max_size=1, lease_timeout=30.0, clock=clock) as pool:
        con = await pool.acquire()  # safepool: ignore (the leak under test: never released)
        clock.advance(29.0)  # seconds, at once: no real sleep
        assert await con.fetchval("SELECT 1") == 1  # still its lease at 29 s
        clock.advance(1.0)  # 30 s: the pool takes the connection back
        with pytest.raises(safepool.LeaseExpiredError):
            await con.fetchval("SELECT 1")
        async with pool.acquire(timeout=5.0) as other:  # the next request is served
            assert await other.fetchval("SELECT 2") == 2
# --8<-- [end:manual_clock]
