"""``max_lifetime`` on PostgreSQL: connections replaced for their age, on
the pool's injected clock (no real waiting for the lifetime), never more
than ``max_size`` backends while they are, and never a lease cut short."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

from .._util import asyncpg_version, held_cancel_requests, until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio


async def backend_pids(admin: asyncpg.Connection, name: str, column: str = "application_name") -> set[int]:
    rows = await admin.fetch(f"SELECT pid FROM pg_stat_activity WHERE {column} = $1", name)
    return {row["pid"] for row in rows}


@contextlib.asynccontextmanager
async def most_backends_seen(pg_dsn: str, app_name: str) -> AsyncIterator[Callable[[], int]]:
    """Polls the server's count of ``app_name``'s backends every 2 ms while
    the block runs; yields a function reading the most seen so far."""
    admin = await asyncpg.connect(pg_dsn)
    most = 0
    stop = asyncio.Event()

    async def poll() -> None:
        nonlocal most
        while not stop.is_set():
            seen = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
            )
            most = max(most, seen)
            await asyncio.sleep(0.002)

    poller = asyncio.create_task(poll())
    try:
        yield lambda: most
    finally:
        stop.set()
        await poller
        await admin.close()


@pytest_asyncio.fixture
async def admin(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


async def test_idle_connections_are_replaced_once_their_lifetime_runs_out_within_max_size(
    pools: Any, pg_dsn: str, app_name: str, admin: asyncpg.Connection
) -> None:
    clock = safepool.ManualClock()
    pool = await pools(min_size=2, max_size=2, max_lifetime=60.0, clock=clock)
    assert pool.options.max_lifetime == 60.0
    before = await backend_pids(admin, app_name)
    assert len(before) == 2
    async with most_backends_seen(pg_dsn, app_name) as most:
        clock.advance(53.9)  # (the first expiry comes after 54 s: 0.9 x 60 at the soonest)
        await asyncio.sleep(0)
        assert pool.stats().connections_retired == 0
        clock.advance(6.1)
        await until(lambda: pool.stats().connections_opened == 4 and pool.stats().idle == 2)
        after = await backend_pids(admin, app_name)
    assert most() <= 2
    assert len(after) == 2 and not after & before
    stats = pool.stats()
    assert (stats.connections_retired, stats.connections_closed, stats.size) == (2, 2, 2)
    # The replacements have lifetimes of their own.
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT pg_backend_pid()") in after


async def test_a_lease_outlives_its_connections_lifetime_and_the_release_closes_it(
    pools: Any, pg_dsn: str, app_name: str, admin: asyncpg.Connection
) -> None:
    """The lifetime runs out while a statement runs: the statement ends as
    it would have, and the connection is closed by the release, before it
    returns, as asyncpg's release closes one past max_queries."""
    clock = safepool.ManualClock()
    pool = await pools(min_size=1, max_size=1, max_lifetime=60.0, clock=clock)
    async with most_backends_seen(pg_dsn, app_name) as most:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
            query = asyncio.create_task(con.fetchval("SELECT 7 FROM pg_sleep(0.3)"))
            await until_in_pg_sleep(pg_dsn, pid)
            clock.advance(61.0)
            assert pool.stats().connections_retired == 1
            assert await query == 7
            assert await con.fetchval("SELECT pg_backend_pid()") == pid  # still the lease's
        # Closed by the release (asyncpg's graceful close: Terminate, then
        # the socket's end), not handed on: the size drops at once.
        assert pool.get_size() == 0
        await until_gone(admin, pid)
        async with pool.acquire() as con:
            assert con.get_server_pid() != pid
    assert most() <= 1
    assert pool.stats().connections_closed == 1


async def until_gone(admin: asyncpg.Connection, pid: int) -> None:
    """Until backend ``pid`` has left pg_stat_activity (a closed backend
    exits a moment after its client's Terminate)."""
    async with asyncio.timeout(5):
        while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            await asyncio.sleep(0.005)


async def test_by_default_connections_live_on(pools: Any, app_name: str, admin: asyncpg.Connection) -> None:
    """max_lifetime=None, the default: asyncpg's pool replaces no connection
    for its age, and neither does safepool's."""
    clock = safepool.ManualClock()
    pool = await pools(min_size=2, max_size=2, max_inactive_connection_lifetime=0, clock=clock)
    assert pool.options.max_lifetime is None
    before = await backend_pids(admin, app_name)
    clock.advance(10 * 365 * 86400.0)
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
    assert await backend_pids(admin, app_name) == before
    assert pool.stats().connections_retired == 0


async def test_an_infinite_max_lifetime_is_none(pools: Any) -> None:
    pool = await pools(max_lifetime=float("inf"))
    assert pool.options.max_lifetime is None
    assert pool._state.next_deadline() is None


@pytest.mark.parametrize("budget", [0.01, 0.0])
async def test_a_retired_connection_released_on_a_short_budget_keeps_its_slot_until_the_cancel_answers(
    pools: Any, pg_dsn: str, app_name: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
    budget: float,
) -> None:
    """The lease's query is cancelled, its connection retired, and it is
    released with a budget shorter than the cancel request takes (held
    back at a gate). The release closes it instead of resetting it, and the
    close aborted it when the budget ran out: that also dropped asyncpg's
    cancel request, and the backend ran the query on beside the slot's
    replacement (2 backends for max_size=1). As a reset's close does, it now
    waits for the server's answer, CANCEL_ANSWER_GRACE at most (raised here)."""
    clock = safepool.ManualClock()
    pool = await pools(min_size=0, max_size=1, max_lifetime=60.0, clock=clock)
    con = await pool.acquire()
    pid = con.get_server_pid()
    query = asyncio.create_task(con.execute("SELECT pg_sleep(5)"))
    await until_in_pg_sleep(pg_dsn, pid)
    gate = held_cancel_requests(monkeypatch)
    query.cancel()
    await until(lambda: con._con._protocol._is_cancelling())
    clock.advance(61.0)
    assert pool.stats().connections_retired == 1
    async with most_backends_seen(pg_dsn, app_name) as most:
        released = asyncio.create_task(pool.release(con, timeout=budget))
        next_lease = asyncio.create_task(pool.fetchval("SELECT pg_backend_pid()"))
        if safepool._internals.CLOSE_UNDER_BUDGET:
            await asyncio.wait([released], timeout=5)
            # The release's budget ran out: it raised then, as before.
            assert released.done() and isinstance(released.exception(), TimeoutError)
        else:
            # asyncpg 0.29-0.31: the release's close keeps the pool's own
            # bound (its close(timeout=) left the transport open when it ran
            # out), so the release waits for the cancel's answer (the
            # CANCEL_ANSWER_GRACE, 30 s here) and does not raise.
            await asyncio.wait([released], timeout=0.5)
            assert not released.done()
        # The slot still counts while the backend runs the query.
        assert (pool.stats().closing, pool.stats().size) == (1, 1)
        assert not next_lease.done() and pid in await backend_pids(admin, app_name)
        gate.set()
        assert await asyncio.wait_for(next_lease, 10) != pid
        if not safepool._internals.CLOSE_UNDER_BUDGET:
            await asyncio.wait_for(released, 10)  # (no error)
    assert most() <= 1
    with pytest.raises(asyncio.CancelledError):
        await query


async def test_the_close_at_release_runs_under_the_acquires_timeout(
    pools: Any, app_name: str, admin: asyncpg.Connection
) -> None:
    """As asyncpg's release of a connection past max_queries: the close of a
    retired connection runs under the release's budget, by default the
    timeout given to acquire() (not the pool's acquire_timeout, which bounds
    the wait only); one it does not fit aborts the connection and the
    release raises TimeoutError (docs/best-practices.md;
    asyncpg 0.32+: before, asyncpg's close under a budget left its transport
    open, and the pool's own bound applies, see _internals.CLOSE_UNDER_BUDGET)."""
    if asyncpg_version() < (0, 32):
        pytest.skip("asyncpg < 0.32: the close keeps the pool's own bound")
    clock = safepool.ManualClock()
    pool = await pools(min_size=1, max_size=1, max_lifetime=60.0, clock=clock)
    con = await pool.acquire(timeout=0)  # (an idle connection: no wait)
    pid = con.get_server_pid()
    clock.advance(61.0)
    with pytest.raises(TimeoutError):
        await pool.release(con)
    await until_gone(admin, pid)
    assert pool.stats().connections_closed == 1
    async with pool.acquire() as fresh:
        assert fresh.get_server_pid() != pid


async def test_a_full_server_does_not_take_the_connections_whose_lifetime_ran_out(
    pools: Any, pg_dsn: str, admin: asyncpg.Connection
) -> None:
    """The incident's database was full: a connect then fails. A pool whose
    connections' lifetimes run out meanwhile keeps them (they work; a new
    one could not be opened) and replaces them once a connect succeeds."""
    role = f"sp_full_{uuid.uuid4().hex[:8]}"
    # (a password too: a server that asks for one, scram-sha-256 over TCP)
    await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2 PASSWORD '{role}'")
    pool = None
    try:
        clock = safepool.ManualClock()
        pool = await pools(min_size=2, max_size=3, max_lifetime=60.0, clock=clock, user=role, password=role)
        first = await backend_pids(admin, role, column="usename")
        leases = [pool.acquire() for _ in range(3)]
        connections = await asyncio.gather(*(lease.__aenter__() for lease in leases), return_exceptions=True)
        refused = [c for c in connections if isinstance(c, BaseException)]
        assert [type(e) for e in refused] == [asyncpg.TooManyConnectionsError]
        for lease, con in zip(leases, connections, strict=True):
            if not isinstance(con, BaseException):
                await lease.__aexit__(None, None, None)
        clock.advance(61.0)
        await asyncio.sleep(0)
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
        assert await backend_pids(admin, role, column="usename") == first
        assert pool.stats().connections_retired == 0
        # The server takes connections again: once one opens, the old ones go.
        await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 5")
        clock.advance(5.0)  # (past the backoff after the refusal)
        async with pool.acquire(), pool.acquire(), pool.acquire():
            pass
        clock.advance(1.0)
        # (back to min_size: the connection opened for the third lease stays)
        await until(lambda: pool.stats().connections_retired == 2 and pool.stats().idle == pool.get_size() == 2)
        assert not await backend_pids(admin, role, column="usename") & first
    finally:
        if pool is not None:
            pool.terminate()
        await until_role_gone(admin, role)
        await admin.execute(f"DROP ROLE {role}")


async def until_role_gone(admin: asyncpg.Connection, role: str) -> None:
    async with asyncio.timeout(5):
        while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
            await asyncio.sleep(0.005)
