"""Review s60 (helper-174, a new user porting an asyncpg service): the
pool-wide ``acquire_timeout`` was also every lease's release budget. With
``acquire_timeout=0`` (a pool that never waits for a connection) each
release after a statement raised a bare ``TimeoutError`` and closed its
connection, a committed INSERT reported as failed; any ``acquire_timeout``
shorter than a reset's round trip did the same (a fail-fast acquire under
latency: connection churn). ``reset_timeout=0`` is refused for exactly that
effect.

Now the pool-wide option bounds the wait (and the ``setup=`` hook) only;
the release's reset runs under ``reset_timeout``. A ``timeout=`` given to
``acquire()`` still bounds that lease's release too, as asyncpg's does
(parity below)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import asyncpg_version

pytestmark = pytest.mark.asyncio


async def test_a_pool_with_acquire_timeout_zero_serves_its_leases(pg_dsn: str, app_name: str) -> None:
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, acquire_timeout=0, server_settings={"application_name": app_name}
    )
    try:
        pids: list[Any] = []
        for _ in range(3):
            async with pool.acquire() as con:  # an idle connection: no wait needed
                pids.append(await con.fetchval("SELECT pg_backend_pid()"))
        assert len(set(pids)) == 1  # one connection, reset and reused
        assert pool.stats().connections_closed == 0
    finally:
        pool.terminate()


async def test_a_committed_write_through_a_shortcut_is_reported_once(pg_dsn: str, app_name: str) -> None:
    table = f"t_{app_name.replace('-', '_')}"
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, acquire_timeout=0, server_settings={"application_name": app_name}
    )
    try:
        await pool.execute(f"CREATE TABLE {table} (a int)")
        assert await pool.execute(f"INSERT INTO {table} VALUES (1)") == "INSERT 0 1"
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 1
        assert pool.stats().connections_closed == 0
    finally:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        pool.terminate()


@pytest.mark.realtime
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_a_timeout_given_to_acquire_bounds_its_release_on_both_pools(pg_dsn: str, flavour: str) -> None:
    """asyncpg's ``async with pool.acquire(timeout=0.2)``: the release's reset
    (here a ``reset=`` hook that never returns) gets those 0.2 s, then the
    release raises ``TimeoutError`` and the connection is closed; the pool
    serves on with a new one. safepool's pool-wide ``acquire_timeout`` does
    not bound it (the hook then runs under ``reset_timeout``)."""
    if asyncpg_version() < (0, 30):
        pytest.skip("asyncpg's reset= is 0.30's")
    never = asyncio.Event()
    stuck = [True]

    async def reset(con: Any) -> None:
        if stuck.pop() if stuck else False:  # (the first lease's only)
            await never.wait()

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, reset=reset)
    try:
        with pytest.raises(TimeoutError):
            async with pool.acquire(timeout=0.2) as con:
                pid = await con.fetchval("SELECT pg_backend_pid()")
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        pool.terminate()


@pytest.mark.realtime
async def test_the_pools_acquire_timeout_leaves_the_release_to_reset_timeout(pg_dsn: str) -> None:
    never = asyncio.Event()

    async def reset(con: Any) -> None:
        await never.wait()

    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset=reset, acquire_timeout=0.1, reset_timeout=0.6
    )
    try:
        loop = asyncio.get_running_loop()
        con = await pool.acquire()
        await con.fetchval("SELECT 1")
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.release(con)
        assert loop.time() - started >= 0.5, "the release ran under acquire_timeout, not reset_timeout"
    finally:
        pool.terminate()
