"""A hostile user's release on a real PostgreSQL: ``__aexit__``'s result
(the reset's driver, or the resolved ``Leaser.released``) handled as asyncpg's
coroutine may be: given to ``create_task()`` or ``run_coroutine_threadsafe()``
(which accept only a coroutine), cancelled before its task ran, awaited twice.
Each compares with asyncpg's pool where asyncpg defines the behaviour."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio

ADVISORY = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"


async def _make(kind: str, dsn: str, app_name: str, **kwargs: Any) -> Any:
    module: Any = asyncpg if kind == "asyncpg" else safepool
    return await module.create_pool(
        dsn, min_size=1, max_size=1, server_settings={"application_name": app_name}, **kwargs
    )


async def _schedule(how: str, aw: Any) -> None:
    if how == "create_task":
        await asyncio.create_task(aw)
    else:
        loop = asyncio.get_running_loop()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(aw, loop))


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("how", ["create_task", "run_coroutine_threadsafe"])
@pytest.mark.parametrize("ran", [True, False], ids=["reset", "clean"])
async def test_aexit_scheduled_as_a_coroutine(pg_dsn: str, app_name: str, kind: str, how: str, ran: bool) -> None:
    """asyncpg's ``__aexit__`` is a coroutine: ``create_task(ctx.__aexit__(...))``
    releases. safepool's returned a driver (or a resolved future) that both
    refuse with TypeError, after the lease had ended: the reset never ran and
    its slot stayed RESETTING for good."""
    pool = await _make(kind, pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        if ran:
            await con.execute("SELECT pg_advisory_lock(1)")
        await _schedule(how, ctx.__aexit__(None, None, None))
        async with asyncio.timeout(5):  # (the only connection: back, reset)
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        if kind == "safepool":
            pool._state.check_invariants()
        pool.terminate()


async def test_release_task_cancelled_before_it_ran_still_resets(pg_dsn: str, app_name: str) -> None:
    """The task running the release's driver is cancelled before its first
    step: a coroutine would run nothing (asyncpg's lease then stays out for
    good), but safepool's lease has already ended, so the pool resets the
    connection and takes it back."""
    pool = await _make("safepool", pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        await con.execute("SELECT pg_advisory_lock(1)")
        task = asyncio.create_task(ctx.__aexit__(None, None, None))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
        pool._state.check_invariants()
    finally:
        pool.terminate()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
async def test_release_awaited_twice(pg_dsn: str, app_name: str, kind: str) -> None:
    """A second await of the same ``__aexit__`` result raises asyncpg's
    RuntimeError; safepool's driver re-ran the finished coroutine and
    reported the reset's end a second time (InternalStateError, or worse,
    for a slot another lease may hold by then)."""
    pool = await _make(kind, pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        await con.execute("SELECT pg_advisory_lock(1)")
        aw = ctx.__aexit__(None, None, None)
        await aw
        async with pool.acquire() as other:  # the slot is leased again meanwhile
            with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
                await aw
            assert await other.fetchval("SELECT 1") == 1
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        if kind == "safepool":
            pool._state.check_invariants()
        pool.terminate()
