"""Invariant probes (helper-144): the server's count of one pool's backends
when the user aborts a leased connection whose statement is still running."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio

LOCK = 144001


async def _backends(admin: asyncpg.Connection, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


async def _wait_blocked(admin: asyncpg.Connection, app_name: str) -> None:
    async with asyncio.timeout(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
            app_name,
        ):
            await asyncio.sleep(0.005)


async def test_user_terminate_mid_statement_keeps_the_slot_until_the_backend_is_gone(
    pg_dsn: str, app_name: str
) -> None:
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
    seen: list[int] = []
    try:
        con = await pool.acquire()
        query = asyncio.create_task(con.execute(f"SELECT pg_advisory_lock({LOCK})"))
        await _wait_blocked(admin, app_name)  # the backend runs the statement, blocked on the admin's lock
        con.terminate()
        with contextlib.suppress(Exception):
            await query
        with contextlib.suppress(Exception):
            await pool.release(con)

        # The next lease: a connect for max_size=1 while the old backend still runs its statement.
        async def acquire_again() -> safepool.PoolConnectionProxy:
            return await pool.acquire(timeout=5)

        second = asyncio.create_task(acquire_again())
        done, _ = await asyncio.wait({second}, timeout=1)
        seen.append(await _backends(admin, app_name))
        if second in done:
            await pool.release(second.result())
        else:
            second.cancel()
            with contextlib.suppress(BaseException):
                await second
    finally:
        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()
    assert max(seen) <= 1, f"the server saw {max(seen)} backends of a pool of max_size=1"
