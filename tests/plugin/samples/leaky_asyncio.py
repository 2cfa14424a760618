"""A user's test suite on pytest-asyncio: one test per way of leaking, and
clean ones. Copied into a pytester directory by test_testing_plugin.py."""

import asyncio
import gc
import os

import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    yield pool
    async with asyncio.timeout(10):  # a leaked connection would make close() wait forever
        await pool.close()


async def handler_without_release(pool):
    con = await pool.acquire()  # LEAK-NO-RELEASE
    return await con.fetchval("SELECT 1")


async def test_no_release(pool):
    assert await handler_without_release(pool) == 1


async def handler_with_early_exit(pool, archived):
    con = await pool.acquire()  # LEAK-EXCEPTION
    if archived:
        raise LookupError("archived customer")  # skips the release below
    await pool.release(con)


async def test_exception_path(pool):
    with pytest.raises(LookupError):
        await handler_with_early_exit(pool, archived=True)


async def test_forgotten_proxy(pool):
    async def forget():
        con = await pool.acquire()  # LEAK-FORGOTTEN
        await con.execute("SELECT 1")

    await forget()
    gc.collect()
    for _ in range(100):  # the pool reclaims the connection in a loop callback
        if pool.get_idle_size() == 1:
            break
        await asyncio.sleep(0.01)


async def test_cancelled_task(pool):
    started = asyncio.Event()

    async def worker():
        con = await pool.acquire()  # LEAK-CANCELLED
        started.set()
        await asyncio.sleep(3600)
        await pool.release(con)

    task = asyncio.create_task(worker())
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture
async def held_connection(pool):
    con = await pool.acquire()  # LEAK-FIXTURE
    yield con
    # the teardown forgets to release it


async def test_fixture_leaks(held_connection):
    assert await held_connection.fetchval("SELECT 2") == 2


async def test_clean_async_with(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1


async def test_clean_finally(pool):
    con = await pool.acquire()
    try:
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await pool.release(con)


async def test_clean_shortcuts_and_cancellation(pool):
    assert await pool.fetchval("SELECT 3") == 3
    inside = asyncio.Event()

    async def worker():
        async with pool.acquire():
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(worker())
    await inside.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture
async def release_later(pool):
    held = []
    yield held
    for con in held:
        await pool.release(con)


@pytest.mark.safepool_allow_leaks
async def test_exempt(pool, release_later):
    release_later.append(await pool.acquire())  # released by the fixture, after the test function
