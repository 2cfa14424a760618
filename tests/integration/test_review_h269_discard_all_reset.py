"""Review h269: a ``connection_class`` whose ``get_reset_query()`` is
``DISCARD ALL`` (asyncpg 0.30+'s documented hook for the reset query; the
classic session reset, PgBouncer's ``server_reset_query``), with
``statement_cache_size=0`` as ``DISCARD ALL`` needs on asyncpg (it drops the
statements asyncpg's cache names), and a lease that leaves a transaction
open: a repository method that starts a transaction by hand and returns
early on a business error, or is cancelled while it holds the transaction.

asyncpg's release rolls back in a statement of its own (``Connection._reset``:
``execute("ROLLBACK")``), then sends the reset query alone: ``DISCARD ALL``
runs, the release returns, the connection is kept, and the open transaction
is reported to the loop's exception handler ("Resetting connection with an
active transaction").

safepool's release sends both in one simple-query message
(``_workers.reset_message``, safepool/_workers.py:751:
``f"ROLLBACK;\\n{query}"``; the inline reset builds it at
safepool/_leasing.py:609, a pool task's at safepool/_workers.py:740). PostgreSQL runs a multi-statement message as
one implicit transaction block, and ``DISCARD ALL`` refuses to run in one:
the reset fails with ``ActiveSQLTransactionError: DISCARD ALL cannot run
inside a transaction block``, the pool closes the connection and
``release()`` raises that error. The handler that returned its result gets
an exception from ``async with pool.acquire()`` instead; one that was
cancelled gets ``ActiveSQLTransactionError`` in place of its
``CancelledError`` (a task group or ``asyncio.timeout()`` around it then
sees a failure, not a cancellation). docs/migration.md documents the one
message as a cost difference only ("Release: the same state, fewer round
trips"). The same happens on the pool-task path (a query logger on the
connection, a class with an ``execute()`` of its own). A ``reset=`` hook or
a class overriding ``reset()`` is reset through asyncpg's own methods and
is not affected (controls below).
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool
from tests._util import skip_before_asyncpg, until

pytestmark = pytest.mark.asyncio

FLAVOURS = ["asyncpg", "safepool"]
OPEN_TRANSACTION = "Resetting connection with an active transaction"


class DiscardAllConnection(asyncpg.Connection):  # type: ignore[misc]
    """The session reset PgBouncer users know: everything the session set,
    prepared, listened to or locked, gone."""

    def get_reset_query(self) -> str:
        return "DISCARD ALL"


class DiscardAllOwnReset(DiscardAllConnection):
    """The same reset query, through a ``reset()`` of the class's own."""

    async def reset(self, *, timeout: float | None = None) -> None:
        await super().reset(timeout=timeout)


async def _discard_all_hook(con: Any) -> None:
    await con.execute("DISCARD ALL")


@pytest_asyncio.fixture
async def accounts(pg_dsn: str) -> AsyncIterator[Any]:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP TABLE IF EXISTS h269_accounts")
    await admin.execute("CREATE TABLE h269_accounts (id int PRIMARY KEY, balance int NOT NULL)")
    await admin.execute("INSERT INTO h269_accounts VALUES (1, 100), (2, 0)")
    try:
        yield admin
    finally:
        await admin.execute("DROP TABLE IF EXISTS h269_accounts")
        await admin.close()


async def _pool(flavour: str, dsn: str, **kwargs: Any) -> Any:
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    kwargs.setdefault("connection_class", DiscardAllConnection)
    return await asyncio.wait_for(factory(dsn, min_size=1, max_size=1, statement_cache_size=0, **kwargs), 10)


async def _transfer(pool: Any, amount: int, started: asyncio.Event | None = None,
                    approval: asyncio.Event | None = None) -> str:
    """A repository method: a transaction started by hand, an early return
    when the balance is short (the transaction left to the pool's reset),
    and, with ``approval``, a wait for another service while it is held."""
    async with pool.acquire(timeout=5) as con:
        tx = con.transaction()
        await tx.start()
        balance = await con.fetchval("SELECT balance FROM h269_accounts WHERE id = 1 FOR UPDATE")
        if balance < amount:
            return "insufficient funds"
        await con.execute("UPDATE h269_accounts SET balance = balance - $1 WHERE id = 1", amount)
        if started is not None and approval is not None:
            started.set()
            await approval.wait()  # (cancelled here)
        await con.execute("UPDATE h269_accounts SET balance = balance + $1 WHERE id = 2", amount)
        await tx.commit()
        return "done"


def _loop_reports() -> tuple[list[str], Callable[[], None]]:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reports: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(str(context.get("message"))))
    return reports, lambda: loop.set_exception_handler(previous)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_an_early_return_inside_a_transaction_releases_normally(
    flavour: str, pg_dsn: str, accounts: Any
) -> None:
    reports, restore = _loop_reports()
    pool = await _pool(flavour, pg_dsn)
    try:
        async with pool.acquire(timeout=5) as con:
            pid = con.get_server_pid()
        assert await _transfer(pool, 500) == "insufficient funds"
        assert any(report.startswith(OPEN_TRANSACTION) for report in reports)
        # The connection was reset and kept: the next lease gets it, and the
        # row lock of the abandoned transaction is gone.
        assert pool.get_size() == 1
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() == pid
        assert await _transfer(pool, 30) == "done"
        assert await accounts.fetch("SELECT balance FROM h269_accounts ORDER BY id") == [(70,), (30,)]
    finally:
        pool.terminate()
        restore()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_request_cancelled_inside_a_transaction_stays_cancelled(
    flavour: str, pg_dsn: str, accounts: Any
) -> None:
    reports, restore = _loop_reports()
    pool = await _pool(flavour, pg_dsn)
    try:
        started, approval = asyncio.Event(), asyncio.Event()
        request = asyncio.ensure_future(_transfer(pool, 40, started, approval))
        await asyncio.wait_for(started.wait(), 5)
        request.cancel()  # (a client gone, a deadline, a task group's failing sibling)
        outcome = (await asyncio.gather(request, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        assert any(report.startswith(OPEN_TRANSACTION) for report in reports)
        assert pool.get_size() == 1
        assert await accounts.fetch("SELECT balance FROM h269_accounts ORDER BY id") == [(100,), (0,)]
    finally:
        pool.terminate()
        restore()


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
@pytest.mark.parametrize("how", ["reset_override", "reset_hook"])
async def test_control_a_custom_reset_running_discard_all(flavour: str, how: str, pg_dsn: str, accounts: Any) -> None:
    """Controls: the same DISCARD ALL through a class's own ``reset()``, or
    a ``reset=`` hook: both pools roll back in a statement of its own first."""
    if how == "reset_hook" and flavour == "asyncpg":
        skip_before_asyncpg((0, 30), "create_pool(reset=)")
    reports, restore = _loop_reports()
    kwargs: dict[str, Any] = (
        {"connection_class": DiscardAllOwnReset} if how == "reset_override" else
        {"connection_class": asyncpg.Connection, "reset": _discard_all_hook}
    )
    pool = await _pool(flavour, pg_dsn, **kwargs)
    try:
        assert await _transfer(pool, 500) == "insufficient funds"
        assert any(report.startswith(OPEN_TRANSACTION) for report in reports)
        assert pool.get_size() == 1
        assert await _transfer(pool, 30) == "done"
    finally:
        pool.terminate()
        restore()


def _logged(query: Any) -> None:
    pass


@pytest.mark.parametrize("how", ["query_logger", "auto", "rollback", "lease_timeout", "collected"])
async def test_the_other_paths_roll_back_alone_before_discard_all(how: str, pg_dsn: str, accounts: Any) -> None:
    """The siblings on safepool's other reset paths: a pool task's reset (a
    query logger on the connection), the auto and rollback modes, a
    lease_timeout take-back and a lost proxy's reclaim: each ends the open
    transaction and runs DISCARD ALL, and the connection is kept."""
    skip_before_asyncpg((0, 30), "Connection.get_reset_query() (0.29 asks _get_reset_query())")
    kwargs: dict[str, Any] = {}
    clock = safepool.ManualClock()
    if how in ("auto", "rollback"):
        kwargs["reset_mode"] = how
    elif how == "lease_timeout":
        kwargs.update(lease_timeout=5.0, clock=clock)
    reports, restore = _loop_reports()
    pool = await _pool("safepool", pg_dsn, **kwargs)
    try:
        async with pool.acquire(timeout=5) as con:
            pid = con.get_server_pid()
        con = await pool.acquire(timeout=5)  # safepool: ignore (taken back or lost under test)
        if how == "query_logger":
            con.add_query_logger(_logged)
        await con.execute("SET application_name = 'h269-left'")
        await con.execute("BEGIN")
        await con.fetchval("SELECT balance FROM h269_accounts WHERE id = 1 FOR UPDATE")
        if how == "lease_timeout":
            clock.advance(6.0)
            await until(lambda: pool.stats().leases_expired == 1)
        elif how == "collected":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                del con
                gc.collect()
            await until(lambda: pool.stats().leaks_detected == 1)
        else:
            await pool.release(con)
        await until(lambda: pool.stats().resetting == 0)
        async with pool.acquire(timeout=5) as again:
            assert again.get_server_pid() == pid  # kept: the reset succeeded
            assert not again.is_in_transaction()
            settings = await again.fetchval("SELECT current_setting('application_name')")
        # The row lock is gone, and DISCARD ALL ran (a class's own reset
        # query is sent after every lease, in every mode: docs/reset-modes.md).
        assert await accounts.fetchval("SELECT count(*) FROM pg_locks WHERE relation = 'h269_accounts'::regclass") == 0
        assert settings == ""
        assert pool.stats().resets_failed == 0
    finally:
        pool.terminate()
        restore()
