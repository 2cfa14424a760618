"""A user's test suite in strict mode whose session fixture keeps a
connection of a one-connection pool: a test's acquire times out behind it."""

import asyncio
import os

import pytest
import pytest_asyncio

import safepool

DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def reference_data(pool):
    con = await pool.acquire()  # SESSION-HOLDER
    yield await con.fetchval("SELECT 1")
    await pool.release(con)


@pytest.mark.asyncio(loop_scope="session")
async def test_times_out_behind_the_session_fixture(pool, reference_data):
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.1)
