"""A user's test suite with acquire timeouts: one caused by a task that holds
its connection while waiting on something else, one by a slow query."""

import asyncio
import os

import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=1) as pool:
        yield pool


async def test_holder_idles_while_another_task_times_out(pool):
    release = asyncio.Event()
    holding = asyncio.Event()

    async def slow_handler():
        async with pool.acquire() as con:  # STRICT-ACQUIRE
            await con.fetchval("SELECT 1")
            holding.set()
            await release.wait()  # IDLE-HOLDER: e.g. an HTTP call made while holding the connection

    task = asyncio.create_task(slow_handler())
    await holding.wait()
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.1)
    release.set()
    await task


async def test_timeout_behind_a_running_query(pool):
    holding = asyncio.Event()

    async def slow_query():
        async with pool.acquire() as con:
            holding.set()  # (the query is sent in the step that follows)
            await con.fetchval("SELECT pg_sleep(0.4)")

    task = asyncio.create_task(slow_query())
    await holding.wait()
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.1)
    await task
