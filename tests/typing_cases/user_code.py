"""User code that type-checks against safepool (tests/test_typing.py runs
mypy --strict, and pyright when installed, on it; it is never imported). Each assert_type() fails the
check when the expression's type is another one, Any included."""

from __future__ import annotations

from typing import Any, assert_type

import asyncpg

import safepool


def takes_asyncpg_pool(pool: asyncpg.Pool) -> None: ...


def takes_connection(con: asyncpg.Connection[Any]) -> None: ...


async def annotated_as_asyncpg(dsn: str) -> None:
    # The drop-in case: code written for asyncpg's pool keeps its annotations.
    pool: asyncpg.Pool = await safepool.create_pool(dsn)
    async with pool.acquire() as con:
        # (mypy: asyncpg's proxy, as the annotation says; pyright narrows
        # the variable to the value's type, safepool's proxy.)
        assert_type(await con.execute("SELECT 1"), str)
        assert_type(con.get_server_pid(), int)
    takes_asyncpg_pool(await safepool.create_pool(dsn))
    async with safepool.create_pool(dsn) as entered:
        takes_asyncpg_pool(entered)
    record_pool: asyncpg.Pool[asyncpg.Record] = await safepool.create_pool(dsn)
    await record_pool.close()


async def annotated_as_safepool(dsn: str) -> None:
    pool = await safepool.create_pool(dsn, max_waiters=10)
    assert_type(pool, safepool.Pool)
    async with pool.acquire(lease_timeout=5.0) as con:
        assert_type(con, safepool.PoolConnectionProxy)
        takes_connection(con)
        assert_type(await con.execute("SELECT 1"), str)
        assert_type(con.get_server_pid(), int)
    con2 = await pool.acquire()
    await pool.release(con2)
    # safepool's own attributes keep their types.
    assert_type(pool.stats(), safepool.PoolStats)
    assert_type(pool.name, str)
    assert_type(pool.leases(), list[safepool.LeaseInfo])
    assert_type(await pool.execute("SELECT 1"), str)
    pool.resize(max_size=4)
    await pool.close()
