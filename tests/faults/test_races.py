"""Races between a grant and the connection's death, replayed in one
synchronous step on a real connection (STYLE rule 17)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

from ._harness import PausedAfterPrepare

pytestmark = pytest.mark.asyncio


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.001)


async def test_connection_lost_between_grant_and_resume(pg_dsn: str) -> None:
    """The released connection is granted to the head waiter, then dies
    before the waiter's task resumes (server restart, pg_terminate_backend):
    the waiter must get another connection, not an internal error."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.fetchval("SELECT 42"))
        await _wait_for(lambda: pool.stats().waiting == 1)
        raw = held._raw
        await pool.release(held)  # no statement ran: handed on synchronously
        raw.terminate()  # ... and dies before the waiter resumes
        assert await asyncio.wait_for(waiter, 10) == 42
        await _wait_for(lambda: pool.stats().in_use == 0 and pool.stats().closing == 0)
        pool._state.check_invariants()
        assert pool.stats().size == 1
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_terminate_between_grant_and_resume(pg_dsn: str) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
    await _wait_for(lambda: pool.stats().waiting == 1)
    await pool.release(held)
    pool.terminate()
    with pytest.raises(safepool.PoolClosedError):
        await asyncio.wait_for(waiter, 10)
    pool._state.check_invariants()
    assert pool._state.size == 0


async def test_connection_lost_of_a_reserved_connection_with_cancel(pg_dsn: str) -> None:
    """Grant, death and the waiter's cancellation all in one step."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
        await _wait_for(lambda: pool.stats().waiting == 1)
        raw = held._raw
        await pool.release(held)
        raw.terminate()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await _wait_for(lambda: pool.stats().closing == 0)
        pool._state.check_invariants()
        assert await pool.fetchval("SELECT 7") == 7
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_lost_idle_connection_is_replaced(pg_dsn: str) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=2, max_size=2)
    try:
        for slot in list(pool._state.slots()):
            slot.connection.terminate()
        assert await pool.fetchval("SELECT 5") == 5
        pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def _no_reset(con: Any) -> None:
    pass


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto", "reset= hook"])
async def test_lease_taken_back_mid_query_is_not_handed_on_busy(pg_dsn: str, app_name: str, reset_mode: str) -> None:
    """A lease past its lease_timeout while its query runs, outside a
    transaction: the take-back cancels the query before the connection goes
    to the next lease. In rollback mode (or with a reset= hook that sends
    nothing) the take-back had nothing to send, so it never saw the query:
    the next lease got "another operation is in progress" and the expired
    holder's query ran on in the next lease's session (found by a
    combined-fault stress run)."""
    clock = safepool.ManualClock()
    options: dict[str, Any] = {"reset": _no_reset} if reset_mode == "reset= hook" else {"reset_mode": reset_mode}
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, server_settings={"application_name": app_name}, **options,
    )
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire(lease_timeout=10)
        holder = asyncio.create_task(con.fetchval("SELECT pg_sleep(5)"))
        async with asyncio.timeout(5):  # the query runs on the server
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                " AND state = 'active' AND query LIKE 'SELECT pg_sleep%'", app_name,
            ):
                await asyncio.sleep(0.005)
        clock.advance(11)  # the lease expires: the pool takes the connection back
        async with asyncio.timeout(5):
            async with pool.acquire() as next_lease:
                assert await next_lease.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(holder, 5)
        assert pool.stats().leases_expired == 1
        pool._state.check_invariants()
    finally:
        await admin.close()
        await asyncio.wait_for(pool.close(), 10)


_CALLS = {
    "fetchval": lambda con: con.fetchval("SELECT pg_sleep(5)"),
    "execute with arguments": lambda con: con.execute("SELECT pg_sleep($1)", 5),
    "executemany": lambda con: con.executemany("SELECT pg_sleep($1)", [(5,), (5,)]),
}


@pytest.mark.parametrize("call", list(_CALLS))
@pytest.mark.parametrize("reset_mode", ["full", "rollback"])
async def test_lease_taken_back_between_the_steps_of_a_call(pg_dsn: str, reset_mode: str, call: str) -> None:
    """The lease expires while its call sits between the call's prepare and
    its bind: the protocol is idle, but the call goes on. The take-back must
    not hand the connection on until the call ended: it sent its reset in
    the gap and handed the connection on, so the holder's next step was
    refused ("another operation is in progress", CI run of 2026-12-02) or
    would run in the next lease's session."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, reset_mode=reset_mode, connection_class=PausedAfterPrepare,
    )
    try:
        con = await pool.acquire(lease_timeout=10)
        raw = con._raw
        raw.paused, raw.go_on = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_CALLS[call](con))
        await asyncio.wait_for(raw.paused.wait(), 5)
        clock.advance(11)  # the lease expires while the call is between its steps

        handed_on = asyncio.Event()
        holder_done_at_hand_on: list[bool] = []

        async def next_lease() -> int:
            async with pool.acquire() as lease:
                holder_done_at_hand_on.append(holder.done())
                handed_on.set()
                raw.paused = raw.go_on = None
                return int(await lease.fetchval("SELECT 1"))

        follower = asyncio.create_task(next_lease())
        # Nothing can announce that a hand-on did not happen: give the
        # take-back time for several resets (one takes ~1 ms here).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handed_on.wait(), 0.3)
        raw.go_on.set()  # the call's next step: the take-back cancels it
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(holder, 5)
        assert await asyncio.wait_for(follower, 5) == 1
        assert holder_done_at_hand_on == [True]
        assert pool.stats().leases_expired == 1
        pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
async def test_lease_taken_back_inside_a_transaction_block(pg_dsn: str, reset_mode: str) -> None:
    """A lease past its lease_timeout inside ``async with con.transaction()``:
    its transaction object (asyncpg's ``_top_xact``) goes with the lease, as
    a release's reset drops it. It stayed on the connection (the holder's
    ``__aexit__`` is refused once the proxy is detached), so the next lease's
    ``transaction()`` was taken for a nested one and sent a SAVEPOINT outside
    any transaction (found by a combined-fault stress run)."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode, clock=clock)
    try:
        con = await pool.acquire(lease_timeout=10)
        inside, leave = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with con.transaction():
                await con.execute("SELECT 1")
                inside.set()
                await leave.wait()

        task = asyncio.create_task(holder())
        await inside.wait()
        clock.advance(11)  # the lease expires: the pool takes the connection back
        async with pool.acquire(timeout=5) as next_lease:
            assert not next_lease.is_in_transaction()
            async with next_lease.transaction():
                assert await next_lease.fetchval("SELECT 1") == 1
        leave.set()
        with pytest.raises(asyncpg.InterfaceError):
            await asyncio.wait_for(task, 5)
        pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


_ = asyncpg


async def test_connection_lost_before_the_pool_watches_it_is_not_kept_idle(pg_dsn: str, app_name: str) -> None:
    """A connect= callback returns a connection the server has already
    terminated (pg_terminate_backend after the login, before the pool could
    watch the connection: asyncpg tells the pool of a loss only from then
    on). The floor connect must not count it idle: it fails as a connect
    (as asyncpg 0.32's "closed during pool initialization"), and the books
    keep matching the server."""
    admin = await asyncpg.connect(pg_dsn)
    kill = False
    returned = asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        con = await asyncpg.connect(*args, **kwargs)
        if kill:
            gone = asyncio.Event()
            con.add_termination_listener(lambda _: gone.set())
            await admin.fetchval("SELECT pg_terminate_backend($1)", con.get_server_pid())
            await asyncio.wait_for(gone.wait(), 10)
            returned.set()
        return con

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, connect=connect, server_settings={"application_name": app_name})
    try:
        kill = True
        pool.resize(min_size=1)  # a connect for the floor, nobody waiting
        await asyncio.wait_for(returned.wait(), 10)
        kill = False
        await _wait_for(lambda: pool.stats().connecting == 0)
        pool._state.check_invariants()
        dead = [slot for slot in pool._state.slots() if slot.connection is not None and slot.connection.is_closed()]
        assert not dead, pool
        assert pool.get_idle_size() == pool.get_size() == int(await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)), pool
        assert await asyncio.wait_for(pool.fetchval("SELECT 1"), 10) == 1
    finally:
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()


async def test_a_connect_under_way_at_expire_connections_is_replaced(pg_dsn: str, app_name: str) -> None:
    """set_connect_args() then expire_connections() while a connect with the
    old arguments is under way (a credential rotation while an acquire
    connects): that connection is closed when it arrives, and the acquire is
    served by one made with the new arguments (asyncpg 0.32 keeps the old
    one: it stamps the generation when the connect finishes)."""
    entered, gate = asyncio.Event(), asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        con = await asyncpg.connect(*args, **kwargs)
        if not entered.is_set():
            entered.set()
            await gate.wait()
        return con

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, connect=connect, server_settings={"application_name": f"{app_name}-old"})
    try:
        acquiring = asyncio.ensure_future(pool.fetchval("SHOW application_name"))
        await asyncio.wait_for(entered.wait(), 10)
        pool.set_connect_args(pg_dsn, server_settings={"application_name": f"{app_name}-new"})
        await pool.expire_connections()
        gate.set()
        assert await asyncio.wait_for(acquiring, 10) == f"{app_name}-new"
        assert pool.stats().connections_closed == 1 and pool.get_size() == 1
    finally:
        await asyncio.wait_for(pool.close(), 10)
