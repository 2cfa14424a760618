"""Review helper-209: a second read of the day's changes (cccb2f0..HEAD)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def table(pg_dsn: str) -> AsyncIterator[str]:
    name = f"h209_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE TABLE {name} (a int)")
        yield name
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")
        await admin.close()


# ------------------------------------------- (b) a COPY under way at release


COPY_IN_FLIGHT = (
    "auto mode: a release while the lease's own neutral COPY (copy_to_table with an async source) still runs "
    "in another task hands the connection on unreset (_autoreset._copying_watched counts Holder.copies, not "
    "Holder.watched, and Leaser.release marks the lease on watched alone): the next lease's first statement "
    "fails with 'another operation is in progress'"
)


@pytest.mark.parametrize(
    "mode", [pytest.param("auto", marks=pytest.mark.xfail(strict=True, reason=COPY_IN_FLIGHT)), "rollback"]
)
async def test_release_while_the_leases_copy_runs_hands_on_a_usable_connection(
    pg_dsn: str, table: str, mode: str
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
    gate = asyncio.Event()
    started = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"1\n"
        started.set()
        await gate.wait()
        yield b"2\n"

    copy: asyncio.Future[Any] | None = None
    try:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        with contextlib.suppress(asyncpg.InterfaceError):
            async with pool.acquire() as con:
                copy = asyncio.ensure_future(con.copy_to_table(table, source=source()))
                await asyncio.wait_for(started.wait(), 10)
                # The lease ends (a program bug: the COPY's task still runs).
        async with pool.acquire(timeout=10) as again:
            assert await again.fetchval("SELECT 1") == 1
            gate.set()
            with contextlib.suppress(Exception):  # (full mode: asyncpg's own error of a closed transport)
                await asyncio.wait_for(copy, 10)
            assert await again.fetchval("SELECT 2") == 2
    finally:
        gate.set()
        if copy is not None and not copy.done():
            copy.cancel()
            with contextlib.suppress(BaseException):
                await copy
        pool.terminate()  # (a close waits out the close of the connection the COPY was on)


# ------------------------------------- (c) a plain callback that returns a Task


TASK_REFUSED = (
    "a plain listener that starts its work as the PoolTypeError's own message advises "
    "(lambda event: loop.create_task(...)) returns the Task, which refuse_awaitable (errors.py) takes for a "
    "dropped coroutine: the listener is logged as failed ('event listener failed ... which the pool does not "
    "await: the work it stands for was not done') though its task was scheduled and runs"
)


@pytest.mark.xfail(strict=True, reason=TASK_REFUSED)
async def test_a_listener_returning_the_task_it_started_is_not_logged_as_failed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    handled: list[Any] = []

    async def handle(event: Any) -> None:
        handled.append(event)

    try:
        loop = asyncio.get_running_loop()
        pool.add_event_listener(lambda event: loop.create_task(handle(event)))
        con = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # a late release: an event (LateRelease)
        await asyncio.sleep(0.05)
        assert handled  # the work was done
        assert not [r for r in caplog.records if "listener failed" in r.getMessage()]
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_a_listener_returning_a_coroutine_is_logged_and_the_coroutine_closed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    handled: list[Any] = []

    async def handle(event: Any) -> None:
        handled.append(event)

    try:
        pool.add_event_listener(lambda event: handle(event))
        con = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # a late release: an event (LateRelease)
        await asyncio.sleep(0.05)
        assert not handled
        assert [r for r in caplog.records if "listener failed" in r.getMessage()]
    finally:
        await asyncio.wait_for(pool.close(), 10)
