"""A pool's repr before it is initialized (helper-218, a fresh user's review).

`pool = safepool.create_pool(dsn)` returns the pool at once; it opens at
`await pool` (or `async with`). Before that, `pool.acquire()` raises
"pool is not initialized" (PoolInterfaceError, as asyncpg's), and a pool
made at import time cannot be awaited at all on the app's loop
(EventLoopMismatchError). Its repr all the while says "open"
(`<safepool.Pool 'pool-...' open size=0/2 ...>`, safepool/pool.py:591:
"closed" if closed, "closing" if closing, else "open"), so a newcomer who
prints the pool next to that error reads that it is open. After a failed
`await pool` the repr says "closed", correctly. Fixed: the repr names the
pool's phase ("not initialized", "starting", "open", "closing", "closed").
"""

from __future__ import annotations

import asyncio

import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def test_a_pool_not_yet_awaited_is_not_shown_as_open(pg_dsn: str) -> None:
    pool = safepool.create_pool(pg_dsn, min_size=1, max_size=2)
    with pytest.raises(safepool.PoolInterfaceError, match="not initialized"):
        await pool.acquire()
    try:
        assert " not initialized " in repr(pool) and " open " not in repr(pool), repr(pool)
    finally:
        await pool
        assert " open " in repr(pool)  # (once awaited, it is)
        closing = asyncio.ensure_future(pool.close())
        async with pool.acquire():
            await asyncio.sleep(0)  # (close() starts: it waits for this lease)
            assert " closing " in repr(pool), repr(pool)
        await closing
        assert " closed " in repr(pool), repr(pool)


async def test_a_pool_being_initialized_says_starting(pg_dsn: str) -> None:
    started = asyncio.Event()
    go_on = asyncio.Event()

    async def init(con: object) -> None:
        started.set()
        await go_on.wait()

    pool = safepool.create_pool(pg_dsn, min_size=1, max_size=1, init=init)
    opening = asyncio.ensure_future(_opened(pool))
    await started.wait()
    try:
        assert " starting " in repr(pool), repr(pool)
    finally:
        go_on.set()
        await opening
        await pool.close()


async def _opened(pool: safepool.Pool) -> safepool.Pool:
    return await pool
