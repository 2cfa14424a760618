"""The server's count of one pool's backends when a leased connection is
aborted while its statement still runs (max_size holds: docs/design.md, "Slot states")."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

import safepool
from tests._util import until

pytestmark = pytest.mark.asyncio

LOCK = 144001


async def _backends(admin: asyncpg.Connection, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


async def _wait_blocked(admin: asyncpg.Connection, app_name: str) -> None:
    async with asyncio.timeout(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
            app_name,
        ):
            await asyncio.sleep(0.005)


async def test_user_terminate_mid_statement_keeps_the_slot_until_the_backend_is_gone(
    pg_dsn: str, app_name: str
) -> None:
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
    seen: list[int] = []
    try:
        con = await pool.acquire()
        query = asyncio.create_task(con.execute(f"SELECT pg_advisory_lock({LOCK})"))
        await _wait_blocked(admin, app_name)  # the backend runs the statement, blocked on the admin's lock
        con.terminate()
        with contextlib.suppress(Exception):
            await query
        with contextlib.suppress(Exception):
            await pool.release(con)

        # The next lease: a connect for max_size=1 while the old backend still runs its statement.
        async def acquire_again() -> safepool.PoolConnectionProxy:
            return await pool.acquire(timeout=5)

        second = asyncio.create_task(acquire_again())
        done, _ = await asyncio.wait({second}, timeout=1)
        seen.append(await _backends(admin, app_name))
        if second in done:
            await pool.release(second.result())
        else:
            second.cancel()
            with contextlib.suppress(BaseException):
                await second
    finally:
        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()
    assert max(seen) <= 1, f"the server saw {max(seen)} backends of a pool of max_size=1"


async def test_terminate_mid_statement_with_max_size_2_and_several_waiters(pg_dsn: str, app_name: str) -> None:
    """Both leases of a max_size=2 pool terminated mid-statement while five
    tasks wait: the server never sees more than 2 of the pool's backends
    (sampled after each acquire), and the old backends' statements end at
    once (their cancel requests), not when the lock is let go."""
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=2, server_settings={"application_name": app_name})
    await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
    seen: list[int] = []
    try:
        leases = [await pool.acquire(), await pool.acquire()]
        old_pids = [con.get_server_pid() for con in leases]
        queries = [asyncio.create_task(con.execute(f"SELECT pg_advisory_lock({LOCK})")) for con in leases]
        async with asyncio.timeout(10):
            while await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                app_name,
            ) < 2:
                await asyncio.sleep(0.005)

        admin_lock = asyncio.Lock()  # (one admin connection for five samplers)

        async def waiter() -> None:
            async with pool.acquire(timeout=10) as con:
                async with admin_lock:
                    seen.append(await _backends(admin, app_name))
                await con.execute("SELECT 1")

        waiters = [asyncio.create_task(waiter()) for _ in range(5)]
        await until(lambda: pool.stats().waiting == 5)  # all five wait before the leases are terminated
        for con in leases:
            con.terminate()
        for query in queries:
            with contextlib.suppress(Exception):
                await query
        for con in leases:
            with contextlib.suppress(Exception):
                await pool.release(con)
        await asyncio.gather(*waiters)
        async with asyncio.timeout(2):  # gone long before the lock is let go
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])", old_pids):
                await asyncio.sleep(0.01)
    finally:
        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()
    assert len(seen) == 5 and max(seen) <= 2, seen


async def test_terminate_of_an_idle_lease_sends_no_cancel_request(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._util import hook_cancel_requests

    sent: list[int] = []

    async def counted(pid: int) -> None:
        sent.append(pid)

    hook_cancel_requests(monkeypatch, counted)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
        con.terminate()
        with contextlib.suppress(Exception):
            await pool.release(con)
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval("SELECT 1") == 1
        assert sent == []
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_close_waits_for_the_cancel_request_of_a_terminated_lease(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._util import held_cancel_requests

    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
    try:
        gate = held_cancel_requests(monkeypatch)
        con = await pool.acquire()
        pid = con.get_server_pid()
        query = asyncio.create_task(con.execute(f"SELECT pg_advisory_lock({LOCK})"))
        await _wait_blocked(admin, app_name)
        con.terminate()
        with contextlib.suppress(Exception):
            await query
        with contextlib.suppress(Exception):
            await pool.release(con)
        closing = asyncio.create_task(pool.close())
        await asyncio.sleep(0.2)
        assert not closing.done()  # the cancel request is held back: the slot still counts
        gate.set()
        await asyncio.wait_for(closing, 10)
        async with asyncio.timeout(2):  # its statement was cancelled: the backend exits
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.01)
    finally:
        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
        if not pool.is_closing():
            await asyncio.wait_for(pool.close(), 10)
        await admin.close()


async def test_terminate_while_a_copy_out_sink_runs_keeps_the_slot_until_the_backend_is_gone(
    pg_dsn: str, app_name: str
) -> None:
    """COPY TO streams its first row (100 kB, flushed at once), then the
    backend sleeps on the second; the sink blocks on the first chunk and the
    lease is terminated meanwhile. The server must not see two backends of
    a pool of max_size=1."""
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    in_sink = asyncio.Event()
    never = asyncio.Event()

    async def sink(chunk: bytes) -> None:
        in_sink.set()
        await never.wait()

    seen: list[int] = []
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        copy = asyncio.create_task(con.copy_from_query(
            "SELECT CASE WHEN g = 1 THEN repeat('x', 100000) ELSE pg_sleep(30)::text END"
            " FROM generate_series(1, 2) AS g",
            output=sink,
        ))
        async with asyncio.timeout(10):
            await in_sink.wait()
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep'", pid
            ):
                await asyncio.sleep(0.005)
        con.terminate()
        copy.cancel()
        with contextlib.suppress(BaseException):
            await copy
        with contextlib.suppress(Exception):
            await pool.release(con)
        async with pool.acquire(timeout=5) as again:
            seen.append(await _backends(admin, app_name))
            await again.execute("SELECT 1")
    finally:
        await admin.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()
    assert seen == [1], f"the server saw {seen} backends of a pool of max_size=1"


class _NoAbortConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class whose terminate() only counts (it does not abort)."""

    terminations = 0

    def terminate(self) -> None:
        type(self).terminations += 1


async def test_a_terminate_that_does_not_abort_leaves_no_abort_reading(pg_dsn: str) -> None:
    """The proxy's terminate() reads whether a statement is in flight before
    the connection class's terminate() runs. One that does not abort leaves
    the connection open: that reading must not stand for a later abort (a
    network loss mid-statement would then get no cancel request)."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=_NoAbortConnection)
    try:
        async with pool.acquire() as con:
            con.terminate()
            assert _NoAbortConnection.terminations == 1
            assert not con.is_closed() and await con.fetchval("SELECT 1") == 1
            assert con._holder.abort_in_flight is None
    finally:
        await asyncio.wait_for(pool.close(), 10)
