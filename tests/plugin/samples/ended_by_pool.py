"""A user's test suite on pytest-asyncio whose leaked connections are ended by
the pool rather than released: ``terminate()``, a ``close()`` that timed out
(it terminates), an ``async with create_pool()`` block whose ``close()`` was
cut short. Then the clean siblings, which must pass. Copied into a pytester
directory by test_testing_plugin.py."""

import asyncio
import os

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


async def test_terminate_after_unreleased_acquire():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    con = await pool.acquire()  # ENDED-TERMINATE
    assert await con.fetchval("SELECT 1") == 1
    pool.terminate()


async def test_close_timing_out():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    con = await pool.acquire()  # ENDED-CLOSE-TIMEOUT
    assert await con.fetchval("SELECT 1") == 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.1)  # cancelled: close() terminates the pool


async def test_async_with_pool_exits_by_terminate():
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:
            async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
                con = await pool.acquire()  # ENDED-ASYNC-WITH
                assert await con.fetchval("SELECT 1") == 1
                # bounds the close() that __aexit__ runs: it times out and terminates
                deadline.reschedule(asyncio.get_running_loop().time() + 0.1)


async def test_clean_release_then_terminate():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    con = await pool.acquire()
    assert await con.fetchval("SELECT 1") == 1
    await pool.release(con)
    pool.terminate()


async def test_clean_release_before_close():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    con = await pool.acquire()
    await pool.release(con)
    await asyncio.wait_for(pool.close(), 5)


async def test_clean_terminate_during_a_query():
    # The holder's `async with` releases the connection after terminate() ended
    # its lease (the query fails): the code was right.
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    pids = []

    async def worker():
        async with pool.acquire() as con:
            pids.append(con.get_server_pid())
            await con.execute("SELECT pg_sleep(10)")

    task = asyncio.create_task(worker())
    async with asyncio.timeout(5):  # until the server runs the query
        while not pids or await pool.fetchval(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pids[0]
        ) != "PgSleep":
            await asyncio.sleep(0.005)
    pool.terminate()
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await task
