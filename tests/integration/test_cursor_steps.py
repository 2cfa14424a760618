"""A lease's cursor counts its multi-step calls on the lease's holder
(``proxy.counted_cursor``, review s70's cursor siblings): while one runs,
the lease is busy (a release resets in a pool task, after the step; a
reclaim or a take-back waits), and once it ends it is not. What the
application sees of the cursor objects stays asyncpg's: their classes'
names and module, ``repr()``, ``isinstance()``, the errors of a cursor used
after its lease."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any

import asyncpg
import asyncpg.cursor
import pytest

pytestmark = pytest.mark.asyncio

MODES = [{}, {"reset_mode": "rollback"}, {"reset_mode": "auto"}]


def _shape(text: str) -> str:
    """``repr()`` of a cursor object, its address left out."""
    return text.rsplit(" ", 1)[0] if "0x" in text else text


@pytest.mark.parametrize("mode", MODES, ids=["full", "rollback", "auto"])
async def test_cursor_objects_read_as_on_asyncpg_pool(pools: Any, pg_dsn: str, mode: dict[str, Any]) -> None:
    pool = await pools(**mode)
    theirs = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        seen: list[tuple[Any, ...]] = []
        for each in (theirs, pool):
            async with each.acquire() as con, con.transaction():
                factory = con.cursor("SELECT generate_series(1, 3)", prefetch=2)
                iterator = factory.__aiter__()
                first = await iterator.__anext__()
                cursor = await con.cursor("SELECT generate_series(1, 3)")
                seen.append((
                    type(factory).__module__, type(factory).__qualname__,
                    isinstance(factory, asyncpg.cursor.CursorFactory),
                    type(iterator).__module__, type(iterator).__qualname__, _shape(repr(iterator)),
                    isinstance(iterator, asyncpg.cursor.CursorIterator),
                    type(cursor).__name__, _shape(repr(cursor)),
                    first[0], [r[0] async for r in iterator], await cursor.fetch(5),
                ))
        assert seen[0] == seen[1]
        assert seen[1][0:3] == ("asyncpg.cursor", "CursorFactory", True)
    finally:
        await theirs.close()


@pytest.mark.parametrize("mode", MODES, ids=["full", "rollback", "auto"])
async def test_a_cursor_step_counts_while_it_runs_and_not_after(pools: Any, mode: dict[str, Any]) -> None:
    pool = await pools(**mode)
    async with pool.acquire() as con, con.transaction():
        holder = con._holder
        counts: list[int] = []
        # An iterator's first step (prepare, bind and execute), then an
        # await of the factory (prepare, bind): each counted from its first
        # loop pass to its end.
        step = asyncio.ensure_future(con.cursor("SELECT 1").__aiter__().__anext__())
        await asyncio.sleep(0)
        counts.append(holder.copies)
        assert (await step)[0] == 1
        counts.append(holder.copies)
        opening = asyncio.ensure_future(_open(con))
        await asyncio.sleep(0)
        counts.append(holder.copies)
        cursor = await opening
        counts.append(holder.copies)
        assert (await cursor.fetchrow())[0] == 1
        counts.append(holder.copies)  # (a Cursor's fetch is one round trip: not counted)
    assert counts == [1, 0, 1, 0, 0]


async def _open(con: Any) -> Any:
    return await con.cursor("SELECT 1")


async def test_a_cursor_step_that_fails_leaves_no_count(pools: Any) -> None:
    pool = await pools()
    async with pool.acquire() as con:
        holder = con._holder
        with pytest.raises(asyncpg.NoActiveSQLTransactionError):
            await con.cursor("SELECT 1")  # (outside a transaction: refused after its prepare)
        with pytest.raises(asyncpg.NoActiveSQLTransactionError):
            async for _ in con.cursor("SELECT 1"):
                pass  # pragma: no cover
        with pytest.raises(asyncpg.UndefinedColumnError):
            async with con.transaction():
                await con.cursor("SELECT no_such_column")
        assert holder.copies == 0


async def test_a_cursor_step_cancelled_leaves_no_count(pools: Any) -> None:
    pool = await pools()
    async with pool.acquire() as con:
        holder = con._holder
        tr = con.transaction()
        await tr.start()
        step = asyncio.ensure_future(con.cursor("SELECT pg_sleep(5)").__aiter__().__anext__())
        while holder.copies == 0:
            await asyncio.sleep(0)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        assert holder.copies == 0
        await tr.rollback()
        assert await con.fetchval("SELECT 1") == 1


async def test_a_cursor_used_after_its_lease_is_refused_as_on_asyncpg_pool(pools: Any, pg_dsn: str) -> None:
    pool = await pools(max_size=1)
    theirs = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        errors: list[tuple[str, str]] = []
        for each in (theirs, pool):
            con = await each.acquire()
            tr = con.transaction()
            await tr.start()
            iterator = con.cursor("SELECT generate_series(1, 3)", prefetch=1).__aiter__()
            assert (await iterator.__anext__())[0] == 1
            cursor = await con.cursor("SELECT 1")
            await tr.rollback()
            await each.release(con)
            for call in (iterator.__anext__, functools.partial(cursor.fetch, 1)):
                with pytest.raises(asyncpg.InterfaceError) as caught:
                    await call()
                errors.append((type(caught.value).__name__, str(caught.value)))
        assert errors[:2] == errors[2:]
        assert all("released back to the pool" in text for _, text in errors)
    finally:
        await theirs.close()


class OwnCursorConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class whose cursor() returns something of its own."""

    def cursor(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return ("own", query)


async def test_a_connection_class_cursor_is_returned_as_it_is(pools: Any) -> None:
    for mode in MODES:
        pool = await pools(connection_class=OwnCursorConnection, **mode)
        async with pool.acquire() as con:
            assert con.cursor("SELECT 1") == ("own", "SELECT 1")


async def test_a_prepared_statement_cursor_is_asyncpg_own(pools: Any) -> None:
    """A prepared statement's cursor() is asyncpg's object, bound to the
    connection (as every object a prepared statement hands out: its steps
    are not counted; docs/migration.md)."""
    pool = await pools()
    async with pool.acquire() as con, con.transaction():
        statement = await con.prepare("SELECT generate_series(1, 2)")
        assert type(statement.cursor()) is asyncpg.cursor.CursorFactory
        assert [r[0] async for r in statement.cursor()] == [1, 2]


async def test_the_counted_classes_keep_asyncpg_names() -> None:
    from safepool import proxy

    for counted, original in ((proxy._CountedCursorFactory, asyncpg.cursor.CursorFactory),
                              (proxy._CountedCursorIterator, asyncpg.cursor.CursorIterator)):
        assert issubclass(counted, original)
        assert (counted.__module__, counted.__name__, counted.__qualname__) == (
            original.__module__, original.__name__, original.__qualname__)
        assert counted.__slots__ == ()  # (the class swap needs asyncpg's layout)


CANCEL_STYLES = ["cancel_once", "cancel_twice", "asyncio_timeout", "wait_for", "anyio_scope", "anyio_scope_every_await"]


async def _cancelled_step(style: str, step: Any) -> None:
    """Run the awaitable made by ``step()`` in a task, cancelled the way
    ``style`` says once the step runs (or, for the timeouts, at once)."""
    if style == "asyncio_timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await step()
        return
    if style == "wait_for":
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(step(), 0.01)
        return
    if style.startswith("anyio"):
        anyio = pytest.importorskip("anyio")

        async def scoped() -> None:
            with anyio.CancelScope() as scope:
                if style == "anyio_scope":
                    scope.deadline = anyio.current_time() + 0.01
                    await step()
                else:
                    # Cancelled at the step's first await, and again at each await
                    # after (a scope's cancel is level-triggered).
                    scope.cancel()
                    await step()
            assert scope.cancelled_caught

        await asyncio.create_task(scoped())
        return
    task = asyncio.ensure_future(step())
    await asyncio.sleep(0.01)  # (the step under way: pg_sleep below)
    task.cancel()
    if style == "cancel_twice":
        await asyncio.sleep(0)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("what", ["iterator", "await"])
@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_a_cursor_step_cancelled_any_way_leaves_no_count_and_sound_books(
    pools: Any, pg_dsn: str, style: str, what: str
) -> None:
    """Each way a cancel arrives (once, twice, asyncio.timeout, wait_for, an
    anyio scope's deadline, a scope that cancels at every await): the
    counter is back to 0 when the step is gone, the release resets, and the
    next lease gets a clean session out of any transaction."""
    pool = await pools(min_size=1, max_size=1)
    # A cursor opened by await binds and does not execute: its step is made
    # slow by a lock its prepare waits for (another session holds it).
    table = f"cursor_steps_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE TABLE {table} (n int)")
        locking = admin.transaction()
        await locking.start()
        await admin.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        async with pool.acquire() as con:
            holder = con._holder
            tr = con.transaction()
            await tr.start()
            if what == "iterator":
                iterator = con.cursor("SELECT pg_sleep(5)").__aiter__()
                await _cancelled_step(style, iterator.__anext__)
            else:
                factory = con.cursor(f"SELECT n FROM {table}")
                await _cancelled_step(style, lambda: factory)
            assert holder.copies == 0
            await tr.rollback()
        await locking.rollback()
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
        assert not con.is_in_transaction()
        assert con._holder.copies == 0
    pool._state.check_invariants()
