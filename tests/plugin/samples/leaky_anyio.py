"""A user's test suite on anyio's pytest plugin (asyncio backend)."""

import os

import pytest

import safepool

pytestmark = pytest.mark.anyio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]
KEPT = []


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool


async def test_leaks(pool):
    KEPT.append(await pool.acquire())  # LEAK-ANYIO


async def test_clean(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
