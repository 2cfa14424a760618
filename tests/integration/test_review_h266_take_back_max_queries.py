"""Review h266: a take-back counts its own reset against ``max_queries``.

a81ce4d closes a connection taken back (``lease_timeout``) or reclaimed
once it ran ``max_queries`` statements, "as a release closes it". A release
(``Leaser.release``, as asyncpg's ``PoolConnectionHolder.release``) and the
reclaim (``Reclaimer.reclaim``, ``safepool/_reclaim.py:136``) read the
count before their reset; the take-back reads it after
(``Reclaimer.take_back_slot``, ``safepool/_reclaim.py:297``), when its own
reset statement (and a ROLLBACK, and any retry) has been counted: a lease
that ran ``max_queries - 1`` statements is handed on when released or
reclaimed, but its connection is closed and replaced when taken back. The
same lease, three outcomes for two.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]

LIMIT = 6


async def _run_to(con: Any, target: int) -> None:
    """Run statements on the lease until its connection counted ``target``."""
    while con._con._protocol.queries_count < target:
        await con.fetchval("SELECT 1")
    assert con._con._protocol.queries_count == target


async def test_control_asyncpg_hands_on_a_connection_one_under_max_queries(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, max_queries=LIMIT)
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        await _run_to(con, LIMIT - 1)
        await pool.release(con)
        async with pool.acquire() as other:
            assert other.get_server_pid() == pid
    finally:
        pool.terminate()


async def test_control_release_hands_on_a_connection_one_under_max_queries(pools: Any) -> None:
    pool = await pools(max_size=1, max_queries=LIMIT)
    con = await pool.acquire()
    pid = con.get_server_pid()
    await _run_to(con, LIMIT - 1)
    await pool.release(con)
    async with pool.acquire(timeout=5) as other:
        assert other.get_server_pid() == pid


async def test_control_reclaim_hands_on_a_connection_one_under_max_queries(pools: Any) -> None:
    pool = await pools(max_size=1, max_queries=LIMIT)
    con = await pool.acquire()  # safepool: ignore (the leak under test)
    pid = con.get_server_pid()
    await _run_to(con, LIMIT - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del con
        gc.collect()
        await until(lambda: pool.stats().leaks_detected == 1)
    async with pool.acquire(timeout=5) as other:
        assert other.get_server_pid() == pid


async def test_take_back_hands_on_a_connection_one_under_max_queries(pools: Any) -> None:
    clock = safepool.ManualClock()
    pool = await pools(max_size=1, lease_timeout=10.0, clock=clock, max_queries=LIMIT)
    con = await pool.acquire()  # safepool: ignore (taken back under test)
    pid = con.get_server_pid()
    await _run_to(con, LIMIT - 1)
    clock.advance(10.0)  # taken back
    async with pool.acquire(timeout=5) as other:
        assert other.get_server_pid() == pid, "closed and replaced: the take-back's reset counted"
        # (Before this lease's release: its reset, with the take-back's, reaches the limit.)
        assert pool.stats().connections_closed == 0
