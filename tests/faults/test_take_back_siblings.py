"""A lease taken back (past its lease_timeout) while its holder is in the
middle of a call of some other shape than a plain query: executemany, a
transaction block, a COPY, a cursor, a query that swallows a cancel, a
LISTEN, a COPY whose file is still opening; and the pool closed or
terminated while the take-back waits for the holder's call.

Each ends with the holder's call raising (not hanging), the next lease
working on a clean session, the core's invariants, and never more backends
on the server than max_size."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

from ._harness import PausedAfterPrepare, fatal_read_eof_unread

pytestmark = pytest.mark.asyncio

_HOLDER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)


@contextlib.asynccontextmanager
async def _backend_sampler(pg_dsn: str, app_name: str, max_size: int) -> AsyncIterator[asyncpg.Connection]:
    """Counts the pool's backends on the server all along (every few ms);
    fails the test if it ever saw more than ``max_size``. Yields its admin
    connection."""
    admin = await asyncpg.connect(pg_dsn)
    sampler_con = await asyncpg.connect(pg_dsn)
    seen: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            seen.append(int(await sampler_con.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.003)

    task = asyncio.create_task(sample())
    try:
        yield admin
    finally:
        stop.set()
        await task
        await sampler_con.close()
        await admin.close()
    assert seen and max(seen) <= max_size, f"backends seen: max {max(seen)} > max_size {max_size}"


async def _wait_active(admin: asyncpg.Connection, app_name: str, like: str) -> None:
    """Until a backend of the pool runs a statement matching ``like``."""
    async with asyncio.timeout(5):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND state = 'active' AND query LIKE $2", app_name, like,
        ):
            await asyncio.sleep(0.005)


async def _assert_clean(lease: Any) -> None:
    assert not lease.is_in_transaction()
    with pytest.raises(asyncpg.NoActiveSQLTransactionError):
        await lease.execute("SAVEPOINT probe")  # refused outside a transaction block
    assert await lease.fetchval("SELECT current_setting('probe.tag', true)") in (None, "")
    assert await lease.fetchval("SELECT 1") == 1


async def _slow_records(n: int) -> AsyncIterator[tuple[int]]:
    for i in range(n):
        await asyncio.sleep(0.01)  # the COPY's source is slow: the COPY runs on the server meanwhile
        yield (i,)


async def _slow_bytes(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        await asyncio.sleep(0.01)
        yield f"{i}\n".encode()


_SWALLOW_ONCE = """
DO $$ BEGIN
  BEGIN PERFORM pg_sleep(5); EXCEPTION WHEN query_canceled THEN RAISE NOTICE 'swallowed'; END;
  PERFORM pg_sleep(5);
END $$"""

_SWALLOW_ONCE_FUNCTION = """
CREATE FUNCTION pg_temp.swallow_once(s float8) RETURNS int LANGUAGE plpgsql AS $$ BEGIN
  BEGIN PERFORM pg_sleep(s); EXCEPTION WHEN query_canceled THEN RAISE NOTICE 'swallowed'; END;
  PERFORM pg_sleep(s);
  RETURN 1;
END $$"""


async def _in_transaction(con: Any, call: Callable[[], Awaitable[Any]]) -> None:
    async with con.transaction():
        await con.execute("SET LOCAL probe.tag = 'holder'")
        await call()


async def _cursor(con: Any) -> None:
    async with con.transaction():
        async for _ in con.cursor("SELECT pg_sleep(5) FROM generate_series(1, 3)", prefetch=1):
            pass


async def _swallow_once_with_arguments(con: Any) -> None:
    await con.execute(_SWALLOW_ONCE_FUNCTION)
    await con.fetchval("SELECT pg_temp.swallow_once($1)", 5.0)


# (holder's call, a pattern of the statement it runs on the server)
_CALLS: dict[str, tuple[Callable[[Any], Awaitable[Any]], str]] = {
    "executemany": (lambda con: con.executemany("SELECT pg_sleep($1)", [(5,), (5,)]), "SELECT pg_sleep%"),
    "execute in a transaction block": (
        lambda con: _in_transaction(con, lambda: con.execute("SELECT pg_sleep(5)")), "SELECT pg_sleep%"),
    "fetchval in a transaction block": (
        lambda con: _in_transaction(con, lambda: con.fetchval("SELECT pg_sleep($1)", 5)), "SELECT pg_sleep%"),
    "copy_records_to_table": (
        lambda con: con.copy_records_to_table("take_back_copy", records=_slow_records(100)), "COPY%"),
    "copy_to_table from an async source": (
        lambda con: con.copy_to_table("take_back_copy", source=_slow_bytes(100)), "COPY%"),
    "cursor": (_cursor, "SELECT pg_sleep%"),
    "a query that swallows the first cancel": (lambda con: con.execute(_SWALLOW_ONCE), "%DO $$%"),
    "a function that swallows the first cancel, with arguments": (
        _swallow_once_with_arguments, "SELECT pg_temp.swallow_once%"),
}


@pytest_asyncio.fixture
async def copy_table(pg_dsn: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP TABLE IF EXISTS take_back_copy; CREATE TABLE take_back_copy (n int)")
    try:
        yield "take_back_copy"
    finally:
        await admin.execute("DROP TABLE IF EXISTS take_back_copy")
        await admin.close()


@pytest.mark.parametrize("call", list(_CALLS))
@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
async def test_lease_taken_back_mid_call(
    pg_dsn: str, app_name: str, copy_table: str, reset_mode: str, call: str
) -> None:
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, reset_mode=reset_mode,
        server_settings={"application_name": app_name},
    )
    try:
        async with _backend_sampler(pg_dsn, app_name, 1) as admin:
            con = await pool.acquire(lease_timeout=10)
            run, pattern = _CALLS[call]
            holder = asyncio.create_task(run(con))
            await _wait_active(admin, app_name, pattern)
            clock.advance(11)  # the lease expires mid-call
            async with asyncio.timeout(5):
                async with pool.acquire() as next_lease:
                    assert holder.done()  # never handed on under a call still running
                    await _assert_clean(next_lease)
            with pytest.raises(_HOLDER_ERRORS):
                await asyncio.wait_for(holder, 5)
            assert pool.stats().leases_expired == 1
            pool._state.check_invariants()
            async with pool.acquire(timeout=5) as again:
                await _assert_clean(again)
            assert await admin.fetchval("SELECT count(*) FROM take_back_copy") == 0  # every COPY was cancelled
    finally:
        await asyncio.wait_for(pool.close(), 10)
    pool._state.check_invariants()


async def test_lease_taken_back_between_cursor_batches(pg_dsn: str, app_name: str) -> None:
    """The lease expires while the holder works on a row of a cursor (no
    call under way): the connection is reset and handed on; the holder's
    next row is refused, even one already prefetched."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, server_settings={"application_name": app_name},
    )
    try:
        async with _backend_sampler(pg_dsn, app_name, 1):
            con = await pool.acquire(lease_timeout=10)
            first_row, go_on = asyncio.Event(), asyncio.Event()
            rows: list[int] = []

            async def holder() -> None:
                async with con.transaction():
                    async for row in con.cursor("SELECT g FROM generate_series(1, 100) g", prefetch=10):
                        rows.append(row[0])
                        first_row.set()
                        await go_on.wait()

            task = asyncio.create_task(holder())
            await asyncio.wait_for(first_row.wait(), 5)
            clock.advance(11)
            async with pool.acquire(timeout=5) as next_lease:
                await _assert_clean(next_lease)
            go_on.set()
            with pytest.raises(asyncpg.InterfaceError):
                await asyncio.wait_for(task, 5)
            assert rows == [1]
            pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("reset_mode", ["full", "rollback"])
async def test_listener_added_by_a_call_the_take_back_waited_for_goes_with_the_lease(
    pg_dsn: str, app_name: str, reset_mode: str
) -> None:
    """add_listener() sends LISTEN (a fetch), then records the callback on
    the connection. The lease expires while the LISTEN is under way: the
    take-back drops the listeners at once, waits for the call, then resets.
    The callback the call recorded afterwards must go too: left there, the
    next lease's add_listener() on that channel sends no LISTEN (full mode:
    the reset ran UNLISTEN *, so it never hears a notification), and the
    expired holder's callback hears the next lease's (rollback mode)."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, reset_mode=reset_mode,
        connection_class=PausedAfterPrepare, server_settings={"application_name": app_name},
    )
    try:
        async with _backend_sampler(pg_dsn, app_name, 1) as admin:
            holder_heard: list[str] = []
            for _attempt in range(5):
                con = await pool.acquire(lease_timeout=10)
                raw = con._raw
                raw.paused, raw.go_on = asyncio.Event(), asyncio.Event()
                holder = asyncio.create_task(
                    con.add_listener("take_back_ch", lambda *args: holder_heard.append(args[-1])))
                await asyncio.wait_for(raw.paused.wait(), 5)
                clock.advance(11)  # the lease expires while the LISTEN is under way
                go_on = raw.go_on
                raw.paused = raw.go_on = None
                go_on.set()
                try:
                    await asyncio.wait_for(holder, 5)
                except asyncpg.QueryCanceledError:
                    # The take-back's cancel hit the LISTEN itself: nothing
                    # recorded, nothing to show. Again.
                    async with pool.acquire(timeout=5):
                        pass
                    continue
                break
            else:
                pytest.skip("every LISTEN was cancelled")
            next_heard = asyncio.Event()

            def next_callback(*args: Any) -> None:
                next_heard.set()

            async with pool.acquire(timeout=5) as next_lease:
                await _assert_clean(next_lease)
                await next_lease.add_listener("take_back_ch", next_callback)
                await admin.execute("NOTIFY take_back_ch, 'for the next lease'")
                await asyncio.wait_for(next_heard.wait(), 5)
                await next_lease.remove_listener("take_back_ch", next_callback)
            assert holder_heard == []
            pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.realtime  # a 50 ms window in which the waiter must not be served; close() cut at 0.2 s
@pytest.mark.parametrize("end", ["terminate", "close", "close cancelled"])
async def test_pool_ended_while_a_take_back_waits_for_the_call(pg_dsn: str, app_name: str, end: str) -> None:
    """The holder's call is stuck between its steps (in_call), so the
    take-back loops; the pool is terminated, closed (the take-back gives up
    at reset_timeout) or its close() is cancelled."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, connection_class=PausedAfterPrepare, reset_timeout=1.0,
        server_settings={"application_name": app_name},
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(pool.terminate)  # (a no-op once the pool is closed)
        admin = await stack.enter_async_context(_backend_sampler(pg_dsn, app_name, 1))
        con = await pool.acquire(lease_timeout=10)
        raw = con._raw
        raw.paused, raw.go_on = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(con.fetchval("SELECT pg_sleep(5)"))
        await asyncio.wait_for(raw.paused.wait(), 5)
        clock.advance(11)
        waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.05)  # (nothing to wait on: the take-back's loop goes on, unseen)
        assert not waiter.done() and pool.stats().resetting == 1
        if end == "terminate":
            pool.terminate()
        elif end == "close":
            await asyncio.wait_for(pool.close(), 10)  # the take-back gives up after reset_timeout
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.close(), 0.2)
        assert pool._state.size == 0
        pool._state.check_invariants()
        with pytest.raises((safepool.PoolClosedError, *_HOLDER_ERRORS)):
            await asyncio.wait_for(waiter, 5)
        raw.go_on.set()
        # (asyncpg's own: a call whose connection was terminated between its
        # steps finds no protocol, AttributeError; asyncpg's pool does the same.)
        with pytest.raises((*_HOLDER_ERRORS, AttributeError)):
            await asyncio.wait_for(holder, 5)
        async with asyncio.timeout(5):
            while await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
            ):
                await asyncio.sleep(0.01)


@pytest.mark.parametrize("method", ["copy_to_table", "copy_from_table"])
@pytest.mark.parametrize("reset_mode", ["full", "auto"])
async def test_lease_taken_back_while_a_copy_opens_its_file(
    pg_dsn: str, app_name: str, method: str, reset_mode: str
) -> None:
    """copy_to_table(source=path) and copy_from_table(output=path) open the
    file in an executor thread before the COPY's first message: the call is
    under way, the protocol idle, no statement section held. A take-back then
    reset the connection and handed it on, and the holder's COPY ran in the
    next lease's session (here, inside the next lease's transaction). A FIFO
    holds the open until the test lets it go."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, reset_mode=reset_mode,
        server_settings={"application_name": app_name},
    )
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP TABLE IF EXISTS take_back_fifo; CREATE TABLE take_back_fifo (n int)")
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "copy.fifo")
        os.mkfifo(fifo)
        try:
            con = await pool.acquire(lease_timeout=10)
            if method == "copy_to_table":
                holder = asyncio.create_task(con.copy_to_table("take_back_fifo", source=fifo))
            else:
                holder = asyncio.create_task(con.copy_from_table("take_back_fifo", output=fifo))

            def opening() -> bool:
                # (Task.get_stack() shows only the outer coroutine: walk the awaits.)
                coro: Any = holder.get_coro()
                while coro is not None:
                    frame = getattr(coro, "cr_frame", None)
                    if frame is not None and frame.f_code.co_name in ("_copy_in", "_copy_out"):
                        return True
                    coro = getattr(coro, "cr_await", None)
                return False

            async with asyncio.timeout(5):
                while not opening():
                    await asyncio.sleep(0.001)
            clock.advance(11)  # the lease expires while the file opens

            handed_on = asyncio.Event()
            holder_done_at_hand_on: list[bool] = []

            async def next_lease() -> int:
                async with pool.acquire() as lease, lease.transaction():
                    holder_done_at_hand_on.append(holder.done())
                    handed_on.set()
                    await asyncio.sleep(0.3)  # the next lease's transaction, open while the holder goes on
                    return int(await lease.fetchval("SELECT count(*) FROM take_back_fifo"))

            follower = asyncio.create_task(next_lease())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handed_on.wait(), 0.3)

            def other_end() -> None:
                if method == "copy_to_table":
                    with open(fifo, "wb") as f:
                        f.write(b"1\n2\n3\n")
                else:
                    with open(fifo, "rb") as f:
                        f.read()

            await asyncio.get_running_loop().run_in_executor(None, other_end)
            with contextlib.suppress(*_HOLDER_ERRORS):
                await asyncio.wait_for(holder, 5)
            rows_seen_by_next = await asyncio.wait_for(follower, 5)
            assert holder_done_at_hand_on == [True], "handed on while the holder's COPY was under way"
            assert rows_seen_by_next in (0, 3)
            pool._state.check_invariants()
        finally:
            # Whatever happened, no executor thread stays blocked in the open
            # (the loop's shutdown would wait for it): O_RDWR opens a FIFO at once.
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
            await asyncio.wait_for(pool.close(), 10)
            await admin.execute("DROP TABLE IF EXISTS take_back_fifo")
            await admin.close()


async def test_query_that_swallows_every_cancel(pg_dsn: str, app_name: str) -> None:
    """A query that catches every cancel: the take-back runs out of its
    budget (reset_timeout) and the connection is closed and replaced; the
    holder's call raises, the next lease works.

    Not checked (a limitation, as with asyncpg's pool): the backend goes on
    with the query until it ends (nothing tells it the client left) while
    the replacement connects, so the server may count one backend more than
    max_size meanwhile (seen here in 2 runs of 3)."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, reset_timeout=0.5,
        server_settings={"application_name": app_name},
    )
    stubborn = """
    DO $$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
      WHILE clock_timestamp() - t0 < interval '3 seconds' LOOP
        BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END;
      END LOOP;
    END $$"""
    try:
        async with _backend_sampler(pg_dsn, app_name, 2) as admin:  # (2: see above)
            con = await pool.acquire(lease_timeout=10)
            holder = asyncio.create_task(con.execute(stubborn))
            await _wait_active(admin, app_name, "%DO $$%")
            clock.advance(11)
            async with pool.acquire(timeout=10) as next_lease:
                await _assert_clean(next_lease)
            with pytest.raises(_HOLDER_ERRORS):
                await asyncio.wait_for(holder, 10)
            pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_lease_taken_back_with_a_listener_left_when_warnings_are_errors(pg_dsn: str) -> None:
    """The holder left a listener on its connection when its lease expired.
    asyncpg warns of it (InterfaceWarning, as a release does); with warnings
    turned into errors (pytest's filterwarnings = error) the warning was
    raised from the pool's timer, in the middle of the take-back: the
    take-back never started, the slot stayed out of the pool for good and
    the next acquire waited forever. The warning still comes, a loop pass
    later, and the take-back goes on."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, clock=clock)
    loop = asyncio.get_running_loop()
    reported: list[BaseException | None] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context.get("exception")))
    try:
        con = await pool.acquire(lease_timeout=10)
        await con.add_listener("take_back_left", lambda *args: None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            clock.advance(11)  # the lease expires with the listener left
            async with pool.acquire(timeout=5) as next_lease:
                await _assert_clean(next_lease)
        assert any(isinstance(exc, asyncpg.InterfaceWarning) and "listener" in str(exc) for exc in reported)
        assert pool.stats().leases_expired == 1
        pool._state.check_invariants()
    finally:
        loop.set_exception_handler(previous_handler)
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("end", ["lease_timeout", "garbage_collected"])
async def test_lease_ended_by_the_pool_after_asyncpg_aborted_its_connection(
    pg_dsn: str, app_name: str, end: str
) -> None:
    """The backend was killed while idle in the lease, and the lease's next
    call came between the client's read of the FATAL and its read of the
    EOF: asyncpg raised InternalClientError and aborted the connection
    without its cleanup, so the pool heard of no loss. The holder then never
    releases: the lease ends by its lease_timeout, or by its proxy being
    garbage collected. The pool ends it as any other (expired, leaked),
    gives the closed connection up rather than handing it on, and the books
    balance."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, server_settings={"application_name": app_name},
    )
    try:
        async with _backend_sampler(pg_dsn, app_name, 1) as admin:
            con = await pool.acquire(lease_timeout=10)
            pid = con.get_server_pid()
            raw = con._raw
            assert await con.fetchval("SELECT 1") == 1
            await fatal_read_eof_unread(admin, raw, pid)
            with pytest.raises(asyncpg.InternalClientError, match="cannot switch to state 11"):
                await con.fetchval("SELECT 2")
            assert raw.is_closed() and pool.stats().in_use == 1  # the pool has heard of nothing
            del raw
            if end == "lease_timeout":
                clock.advance(11)
            else:
                del con
                gc.collect()
            async with asyncio.timeout(5):
                async with pool.acquire() as next_lease:
                    assert next_lease.get_server_pid() != pid
                    await _assert_clean(next_lease)
            s = pool.stats()
            ended = (1, 0) if end == "lease_timeout" else (0, 1)
            assert (s.leases_expired, s.leaks_detected, s.released, s.leases_discarded) == (*ended, 1, 0)
            assert s.acquired == s.released + s.leases_expired + s.leaks_detected + s.leases_discarded + s.in_use
            pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)
    pool._state.check_invariants()
