"""Review s61, hand-made mutation review of the lease path (safepool/
_leasing.py, proxy.py, the release, reset, listener and cancel-request
helpers of _internals.py, and the auto reset's classifier): behaviour no
test caught when it was broken on purpose (one small edit at a time, the
tests that exercise it run against it). Each test here fails against the
mutation named in its docstring and passes against the code as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from safepool.proxy import PoolConnectionProxy
from tests._util import MakePool, until

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["asyncpg", "safepool"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_release_inside_a_managed_transaction_block_is_not_reported(
    make_pool: MakePool, flavour: str
) -> None:
    """A connection released from inside ``async with con.transaction():``
    has a transaction open, but a managed one: asyncpg's reset rolls it
    back without the loop's "Resetting connection with an active
    transaction" report (its ``_reset()``: "Managed transactions are
    guaranteed to __aexit__ correctly"), which it keeps for a transaction
    left open by hand. On both pools: no report, the block's exit raises
    ``InterfaceError`` (its transaction belongs to a released lease), and
    the next lease of the connection finds no transaction and none of the
    block's work.

    Mutation killed: ``_internals.warn_open_transaction`` reports every
    open transaction (the ``_top_xact._managed`` check dropped): safepool
    logged an error through the loop's exception handler where asyncpg's
    pool is silent."""
    pool = await make_pool(min_size=1, max_size=1)
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context["message"])))
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        with pytest.raises(asyncpg.InterfaceError):
            async with con.transaction():
                await con.execute("CREATE TEMP TABLE s61_managed (a int)")
                await pool.release(con)
        await asyncio.sleep(0)  # (a report queued with call_soon has come by now)
        assert reported == []
        async with pool.acquire() as con:
            assert con.get_server_pid() == pid
            assert not con.is_in_transaction()
            assert await con.fetchval("SELECT to_regclass('pg_temp.s61_managed')") is None
    finally:
        loop.set_exception_handler(None)


async def test_after_a_take_back_an_idle_connections_termination_listener_gets_the_connection(
    pools: Any, pg_dsn: str
) -> None:
    """A termination listener that ``init=`` registered gets what asyncpg
    hands its callbacks: the proxy while the connection is leased, the
    connection itself while it is idle (``Connection._unwrap()``: its
    ``_proxy`` is None). After a lease the pool took back
    (``lease_timeout``), the idle connection must not refer to that lease's
    proxy any more: a connection that dies while idle would hand its
    listener the expired proxy, an object that raises ``LeaseExpiredError``
    at every use, which the program may still hold (as here).

    Mutation killed: ``PoolConnectionProxy._detach`` no longer clears the
    connection's ``_proxy`` (the take-back detaches through it, via
    ``_internals.detach_proxy``); the release inlines its own detach, so
    no other test noticed."""
    got: list[Any] = []
    arrived = asyncio.Event()

    def on_termination(connection: Any) -> None:
        got.append(connection)
        arrived.set()

    async def init(con: Any) -> None:
        con.add_termination_listener(on_termination)

    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock, init=init)
    expired = await pool.acquire(lease_timeout=10)
    pid = expired.get_server_pid()
    clock.advance(11)  # the lease expires: taken back, reset, idle again
    await until(lambda: pool.stats().idle == 1)
    with pytest.raises(safepool.LeaseExpiredError):
        await expired.fetchval("SELECT 1")
    admin = await asyncpg.connect(pg_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await admin.close()
    async with asyncio.timeout(5):
        await arrived.wait()
    assert got[0] is not expired
    assert not isinstance(got[0], PoolConnectionProxy)
    assert isinstance(got[0], asyncpg.Connection)


async def test_auto_mode_a_session_change_first_awaited_after_its_lease_is_refused(pools: Any, app_name: str) -> None:
    """``reset_mode="auto"``, a missing await: the coroutine of a
    session-changing statement made in one lease is first awaited after
    that lease's release. It is refused there (``_autoreset._marking``),
    and nothing is sent: the next lease sees the session as it was. (Until
    review h227 it ran on the connection and marked it, which a neutral
    statement's coroutine did not.)

    Mutation killed: ``_marking`` no longer refuses a call whose lease
    ended (the SET runs, and the next lease, which runs only neutral SQL,
    hands the connection on with it)."""
    pytest.importorskip("pglast")
    pool = await pools(min_size=1, max_size=1, reset_mode="auto")
    async with pool.acquire():
        pass  # (the first lease of a connection always resets)
    async with pool.acquire() as con:
        late = con.execute("SET application_name = 's61-late'")
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        await late
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == app_name
