"""The drop-in minimum of the benchmarks' calibration
(``benchmarks._workloads.DropInMinimumPool``) keeps the semantics its rows
claim, on a real PostgreSQL: the proxy forwards and goes dead at release, a
release leaves no transaction or session state behind, and cancelling the
releasing task does not cut the reset short (the next lease still finds the
connection reset). Its timing is the benchmarks'; these check only that what
they time is the pool the docs describe."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

import asyncpg
import pytest

from benchmarks._workloads import DropInMinimumPool, dropin_minimum_pool, until

pytestmark = pytest.mark.asyncio

# What a lease leaves behind when nothing resets it: an open transaction, a
# session setting, and a session advisory lock (which a ROLLBACK keeps).
DIRTY = ("BEGIN", "SET search_path TO pg_catalog", "SELECT pg_advisory_lock(4242)")
ADVISORY_HELD = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"


async def open_pool(dsn: str, size: int) -> DropInMinimumPool:
    pool: DropInMinimumPool = await dropin_minimum_pool(dsn, size)()
    return pool


async def assert_clean(con: object) -> None:
    assert isinstance(con, asyncpg.Connection)  # (the proxy passes asyncpg's isinstance check)
    assert not con.is_in_transaction()
    assert await con.fetchval("SHOW search_path") != "pg_catalog"
    assert await con.fetchval(ADVISORY_HELD) == 0


async def test_a_lease_gets_a_forwarding_proxy_that_fails_after_release(pg_dsn: str) -> None:
    pool = await open_pool(pg_dsn, 1)
    try:
        async with pool.acquire() as con:
            assert isinstance(con, asyncpg.Connection)
            assert await con.fetchval("SELECT 1") == 1
            assert con.get_server_pid() > 0
        with pytest.raises(asyncpg.InterfaceError, match="released"):
            await con.fetchval("SELECT 1")
        with pytest.raises(asyncpg.InterfaceError, match="released"):
            con._protocol  # noqa: B018  # (an attribute that is not a forwarded method)
        assert len(pool._idle) == 1
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT 2") == 2
    finally:
        await pool.close()


@pytest.mark.parametrize("failed", [False, True], ids=["open transaction", "failed transaction"])
async def test_a_release_leaves_no_transaction_and_no_session_state(pg_dsn: str, failed: bool) -> None:
    pool = await open_pool(pg_dsn, 1)
    try:
        async with pool.acquire() as con:
            for statement in DIRTY:
                await con.execute(statement)
            if failed:
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await con.execute("SELECT 1 / 0")
            assert con.is_in_transaction()
        async with pool.acquire() as con:
            await assert_clean(con)
    finally:
        await pool.close()


async def test_cancelling_the_release_mid_reset_still_resets_before_the_next_lease(pg_dsn: str) -> None:
    """Size 1, a waiter queued: the releasing task is cancelled while the
    reset is on the wire. It gets CancelledError at once; a pool task
    finishes the reset, and only then is the waiter handed the connection."""
    pool = await open_pool(pg_dsn, 1)
    try:
        lease = pool.acquire()
        con = await lease.__aenter__()
        for statement in DIRTY:
            await con.execute(statement)
        seen: list[bool] = []

        async def waiter() -> None:
            async with pool.acquire() as next_con:
                seen.append(True)
                await assert_clean(next_con)

        waiting = asyncio.create_task(waiter())
        await until(lambda: len(pool._waiters) == 1)
        handed: list[asyncio.Task[object]] = []  # the pool tasks the release hands its reset to
        spawn = pool._spawn

        def spawn_and_note(coro: Coroutine[object, object, object]) -> asyncio.Task[object]:
            task = spawn(coro)
            handed.append(task)
            return task

        pool._spawn = spawn_and_note  # type: ignore[method-assign]

        async def release() -> None:
            await lease.__aexit__(None, None, None)

        releasing = asyncio.create_task(release())
        # The release's first step detaches the proxy and sends the reset;
        # the cancel comes in the same loop pass, right after it (the ready
        # queue is FIFO on both loops), before the loop reads any reply.
        # (Waiting for the detach and cancelling a pass later raced the
        # server's answer: a flake on uvloop under load.)
        asyncio.get_running_loop().call_soon(releasing.cancel)
        with pytest.raises(asyncio.CancelledError):
            await releasing
        assert con._con is None  # (the first step ran: the proxy is detached)
        # (Whether the pool task is still running here depends on how soon
        # the server answers: the loop may read the reply before this task
        # resumes. What the test holds to is the hand-over, and that the
        # waiter's lease finds the connection reset.)
        assert len(handed) == 1, "the reset was not handed to a pool task"
        await waiting  # (its assertions: the reset ran to the end)
        assert seen and len(pool._idle) == 1 and handed[0].done()
    finally:
        await pool.close()


async def test_a_waiter_cancelled_after_its_grant_passes_the_connection_on(pg_dsn: str) -> None:
    pool = await open_pool(pg_dsn, 1)
    try:
        lease = pool.acquire()
        await lease.__aenter__()

        async def waiter() -> None:
            async with pool.acquire():
                raise AssertionError("a cancelled waiter got its lease")

        waiting = asyncio.create_task(waiter())
        await until(lambda: len(pool._waiters) == 1)

        def grant_then_cancel(con: asyncpg.Connection, error: Exception | None) -> Exception | None:
            del pool._back  # once: the cancelled waiter's own pass-on is the class's
            result = pool._back(con, error)  # resolves the waiter's future
            waiting.cancel()  # in the same step: before the waiter resumes
            return result

        pool._back = grant_then_cancel  # type: ignore[method-assign]
        await lease.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(pool._idle) == 1 and not pool._waiters
        async with pool.acquire() as con:
            await assert_clean(con)
    finally:
        await pool.close()
