"""Review s60: a lease that expires while its holder's call waits for
asyncpg's own cancellation of an earlier statement.

A statement the holder's client cancels (its ``timeout=``, ``command_timeout``,
an ``asyncio.timeout()`` or a task cancel around it) leaves asyncpg's protocol
"cancelling" until the server answers. The holder's next call (the
``ROLLBACK`` of its ``async with con.transaction():`` exit, a ``COMMIT``,
``Transaction.rollback()``, a savepoint's ``ROLLBACK TO``, a cursor's fetch,
a plain ``con.execute()``) passes every check (the proxy's gate, asyncpg's
``_check_conn_validity``) and then waits in the protocol
(``Protocol.query()`` awaits ``_wait_for_cancellation()`` *before*
``_check_state()``). If the lease expires in that wait, the take-back's
reset waits too, or runs at once if the cancellation ended already; when
the take-back's first step comes between the end of the cancellation and
the holder's resumption (the holder resumes two loop passes after the
server's answer: asyncio.shield's callback, then the task's), the
take-back's ``ROLLBACK; <reset query>`` goes on the wire first, and the
holder's statement is refused with asyncpg's raw
``InterfaceError: cannot perform operation: another operation is in
progress``: the pool's own take-back leaks to the holder, where
docs/leases.md promises ``LeaseExpiredError`` (or, for a transaction
object, asyncpg's "the underlying connection has been released back to
the pool"). The soak saw it 6 times in 136 PgBouncer runs; here the lease
expires (``ManualClock.advance()``) from a done-callback on asyncpg's
cancellation futures, registered before the holder's wait, so it lands in
that window every time.

The pool itself was fine afterwards (the next lease clean, the core's
invariants held): only the holder's error was wrong. Now the take-back lets
two loop passes go by before its first step (``_workers.take_back``): the
holder's call goes first and gets its own outcome, as on a lease that does
not expire (compared here with that run), or the take-back's cancel
(``QueryCanceledError``, docs/leases.md); the holder's next call raises
``LeaseExpiredError``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from asyncpg.connection import Connection

import safepool
from tests._pgbouncer import Bouncer, requires_pgbouncer

pytestmark = pytest.mark.asyncio

def _expiring_connection_class(clock: safepool.ManualClock, expire: bool = True) -> type[Connection]:
    """A connection class that expires the lease (advances ``clock`` past
    any lease_timeout) in the loop pass where the last of asyncpg's
    cancellation futures (the cancel request sent, the cancelled
    statement's answer) completes: its done-callbacks are registered when
    the cancel starts, so they run before those of the holder's call
    waiting in ``_wait_for_cancellation()``, and the take-back's first step
    is queued before the holder's resumption."""

    class ExpireWhenCancelled(Connection):  # type: ignore[misc]
        fired = not expire

        def _cancel_current_command(self, waiter: Any, cancel_waiter: Any = None) -> None:
            # (asyncpg < 0.32 passes the one waiter: the request's.)
            super()._cancel_current_command(waiter, *(() if cancel_waiter is None else (cancel_waiter,)))
            futures = [f for f in (waiter, cancel_waiter) if f is not None]

            def done(_future: Any) -> None:
                if not type(self).fired and all(f.done() for f in futures):
                    type(self).fired = True
                    clock.advance(11)  # lease_timeout=10: the lease expires now

            for future in futures:
                future.add_done_callback(done)

    return ExpireWhenCancelled


def _lease_error_as_documented(error: BaseException) -> bool:
    """What docs/leases.md says a taken-back lease's holder gets: safepool's
    LeaseExpiredError, or (from a transaction object, a cursor, a prepared
    statement: asyncpg's classes check the connection themselves) asyncpg's
    InterfaceError saying the connection went back to the pool."""
    if isinstance(error, safepool.LeaseExpiredError):
        return True
    return isinstance(error, asyncpg.InterfaceError) and "released back to the pool" in str(error)


def _describe(outcome: Any) -> str:
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    return f"returned {outcome!r}"


async def _block_raises_statement_timeout(con: Any) -> BaseException:
    try:
        async with con.transaction():
            await con.execute("SELECT pg_sleep(5)", timeout=0.1)
    except BaseException as exc:  # noqa: BLE001 (the outcome under test)
        return exc
    return None  # (nothing raised)


async def _block_raises_asyncio_timeout(con: Any) -> BaseException:
    try:
        async with con.transaction():
            async with asyncio.timeout(0.1):
                await con.execute("SELECT pg_sleep(5)")
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None  # (nothing raised)


async def _block_commits_after_swallowed_timeout(con: Any) -> BaseException:
    try:
        async with con.transaction():
            try:
                await con.execute("SELECT pg_sleep(5)", timeout=0.1)
            except TimeoutError:
                pass  # the block goes on: its exit sends COMMIT
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None  # (nothing raised)


async def _manual_rollback(con: Any) -> BaseException:
    transaction = con.transaction()
    await transaction.start()
    try:
        await con.execute("SELECT pg_sleep(5)", timeout=0.1)
    except TimeoutError:
        pass
    try:
        await transaction.rollback()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


async def _savepoint_exit(con: Any) -> BaseException:
    """The inner (savepoint) block's exit: its ROLLBACK TO waits for the
    cancellation. (The outer block's exit then raises the documented
    error, with this one as its __context__.)"""
    inner: list[BaseException] = []
    try:
        async with con.transaction():
            try:
                async with con.transaction():
                    await con.execute("SELECT pg_sleep(5)", timeout=0.1)
            except BaseException as exc:  # noqa: BLE001
                inner.append(exc)
                raise
    except BaseException:  # noqa: BLE001 (the outer exit's)
        pass
    return inner[0] if inner else None


async def _cursor_fetch_after_timeout(con: Any) -> BaseException:
    fetched: list[BaseException] = []
    try:
        async with con.transaction():
            cursor = await con.cursor("SELECT pg_sleep(0.5) FROM generate_series(1, 5)")
            try:
                await cursor.fetch(2, timeout=0.1)
            except TimeoutError:
                pass
            try:
                await cursor.fetch(1)
            except BaseException as exc:  # noqa: BLE001
                fetched.append(exc)
    except BaseException:  # noqa: BLE001 (the block's exit, after the fetch's error)
        pass
    return fetched[0] if fetched else None


async def _execute_after_timeout(con: Any) -> BaseException:
    """No transaction: the proxy's own execute() passes its gate (the lease
    is not expired yet) and waits in the protocol the same way."""
    try:
        await con.execute("SELECT pg_sleep(5)", timeout=0.1)
    except TimeoutError:
        pass
    try:
        return await con.execute("SELECT 1")
    except BaseException as exc:  # noqa: BLE001
        return exc


_HOLDERS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "transaction exit, block raised the statement's timeout": _block_raises_statement_timeout,
    "transaction exit, block raised asyncio.timeout's": _block_raises_asyncio_timeout,
    "transaction exit, COMMIT after a swallowed timeout": _block_commits_after_swallowed_timeout,
    "Transaction.rollback() after a timeout": _manual_rollback,
    "savepoint exit": _savepoint_exit,
    "cursor fetch after a timeout": _cursor_fetch_after_timeout,
    "execute after a timeout, no transaction": _execute_after_timeout,
}


async def _outcome(dsn: str, holder_call: Callable[[Any], Awaitable[Any]], expire: bool, **options: Any) -> Any:
    """The holder's outcome (its call's error, or what it returned), on a
    lease that expires while the call waits for the cancellation, or (not
    ``expire``) on one that never does."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        dsn, min_size=1, max_size=1, clock=clock, connection_class=_expiring_connection_class(clock, expire),
        statement_cache_size=0, **options,
    )
    try:
        con = await pool.acquire(lease_timeout=10)
        outcome = await asyncio.wait_for(holder_call(con), 10)
        assert pool.stats().leases_expired == (1 if expire else 0)
        if expire:
            with pytest.raises(safepool.LeaseExpiredError):
                await con.fetchval("SELECT 1")  # the holder's next call
        else:
            await pool.release(con)
        async with pool.acquire(timeout=5) as next_lease:  # the pool is fine either way
            assert not next_lease.is_in_transaction()
            assert await next_lease.fetchval("SELECT 1") == 1
        pool._state.check_invariants()
        return outcome
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def _run(dsn: str, holder_call: Callable[[Any], Awaitable[Any]], **options: Any) -> None:
    expired = await _outcome(dsn, holder_call, True, **options)
    assert "another operation is in progress" not in str(expired), f"raw asyncpg error reached the holder: {expired!r}"
    if isinstance(expired, asyncpg.QueryCanceledError) or (
        isinstance(expired, BaseException) and _lease_error_as_documented(expired)
    ):
        return  # (the take-back's cancel, or the documented errors of docs/leases.md)
    kept = await _outcome(dsn, holder_call, False, **options)
    assert _describe(expired) == _describe(kept), "the call's own outcome, as on a lease that does not expire"


@pytest.mark.parametrize("holder", list(_HOLDERS))
async def test_call_waiting_for_a_cancellation_when_the_lease_expires(pg_dsn: str, holder: str) -> None:
    await _run(pg_dsn, _HOLDERS[holder])


async def test_control_call_after_the_take_back_raises_the_documented_error(pg_dsn: str) -> None:
    """Control: the same transaction block, expired before its exit (the
    lease expires at the statement's cancellation, the exit comes after the
    take-back): the documented error."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, clock=clock, statement_cache_size=0)
    try:
        con = await pool.acquire(lease_timeout=10)
        with pytest.raises(asyncpg.InterfaceError) as caught:
            async with con.transaction():
                try:
                    await con.execute("SELECT pg_sleep(5)", timeout=0.1)
                finally:
                    clock.advance(11)
        assert _lease_error_as_documented(caught.value), repr(caught.value)
        assert pool.stats().leases_expired == 1
    finally:
        await asyncio.wait_for(pool.close(), 10)


# ----------------------------------------------------------------- through PgBouncer


@pytest_asyncio.fixture
async def bouncer_dsn(pg_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A PgBouncer (pool_mode from the test's ``pool_mode`` parameter) in
    front of the test server, connecting as the test server's user."""
    con = await asyncpg.connect(pg_dsn)
    try:
        addr, params = con._addr, con._params
    finally:
        await con.close()
    if isinstance(addr, str):  # a Unix socket: .../.s.PGSQL.<port>
        host, port = os.path.dirname(addr), int(addr.rsplit(".", 1)[1])
    else:
        host, port = addr
    upstream = {
        "host": host, "port": port, "database": params.database, "user": params.user,
        "password": params.password, "server_user": params.user,
    }
    root = tempfile.mkdtemp(prefix="safepool-pgbouncer-")
    os.chmod(root, 0o755)
    bouncer = Bouncer(upstream, Path(root), pool_mode=request.param, default_pool_size=2)
    try:
        bouncer.start()
        yield bouncer.dsn()
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


_BOUNCER_HOLDERS = [
    "transaction exit, block raised the statement's timeout",
    "transaction exit, COMMIT after a swallowed timeout",
    "Transaction.rollback() after a timeout",
]


@requires_pgbouncer
@pytest.mark.parametrize("holder", _BOUNCER_HOLDERS)
@pytest.mark.parametrize("bouncer_dsn", ["session", "transaction"], indirect=True)
async def test_call_waiting_for_a_cancellation_when_the_lease_expires_through_pgbouncer(
    bouncer_dsn: str, holder: str
) -> None:
    await _run(bouncer_dsn, _HOLDERS[holder], reset_mode="rollback")
