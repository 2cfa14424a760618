"""A user's test suite that opts in per test, with no command-line option."""

import os

import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]
KEPT = []


@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool


async def test_guarded(safepool_leak_check, pool):
    KEPT.append(await pool.acquire())  # LEAK-GUARDED


async def test_guarded_clean(safepool_leak_check, pool):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
    safepool_leak_check.check()


async def test_not_guarded(pool):
    con = await pool.acquire()
    KEPT.append(con)
    await pool.release(con)
