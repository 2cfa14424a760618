"""Review h253: on asyncpg 0.29-0.31 a lease's task cancelled inside
``async with con.transaction()`` hung for good in the transaction's
ROLLBACK when the pool took the lease back (``lease_timeout``) and closed
its connection meanwhile.

Found as "N workers still running 10 s after stop" in
tests/integration/test_review_h229_books.py (``SAFEPOOL_H229_SEED=5``, and
8, quiet_close, on the 0.29 and 0.31 overlays; the 0.32 venv passes): the
stuck task is ``Run.slow`` in ``Transaction.__aexit__`` ->
``Connection.execute("ROLLBACK;")`` -> the protocol's ``query()``, which
first awaits ``protocol.cancel_waiter`` (the cancellation asyncpg started
when the task was cancelled mid-statement). The pool logged "could not take
back an expired connection cleanly (TimeoutError); closing it" and aborted
the connection. asyncpg 0.32 completes the protocol's cancellation futures
when the connection is aborted or lost (``Protocol._complete_cancel_waiters``,
called from ``abort()`` and ``_on_connection_lost``); 0.29-0.31 leave them
pending, with nothing left to answer them. Whatever the lease's task awaits
on them then waited for ever.

Fixed (session s76): ``_internals.complete_cancel_waiters`` completes them
on asyncpg < 0.32 from the pool's own termination listener
(``_internals.attach_holder``), which every close, abort and loss of a pool
connection runs: the ROLLBACK raises ``InterfaceError`` there. A backend the server ends while the ROLLBACK waits
(the second test) hangs the task on asyncpg 0.29-0.31's own pool still.

Deterministic here: asyncpg's cancel request is held (the server never
answers the cancel while the ROLLBACK waits), and the pool's grace for the
answer is short, so the take-back gives up and aborts the connection."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
import safepool._workers

from .._util import asyncpg_version, held_cancel_requests, rollback_awaiting_cancellation

pytestmark = pytest.mark.asyncio


async def test_a_rollback_waiting_for_a_cancel_ends_when_the_pool_takes_the_lease_back(
    pools: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = safepool.ManualClock()
    pool = await pools(min_size=0, max_size=1, clock=clock, reset_timeout=0.3)
    con = await pool.acquire(lease_timeout=1.0)
    raw = con._raw
    gate = held_cancel_requests(monkeypatch)
    monkeypatch.setattr(safepool._workers, "CANCEL_ANSWER_GRACE", 0.2)
    # (asyncpg cancels the statement, its request held; the ROLLBACK awaits the answer)
    task = await rollback_awaiting_cancellation(con, raw, pg_dsn)
    clock.advance(2.0)  # the lease expires: the pool takes it back
    async with asyncio.timeout(10):
        while not raw.is_closed():  # (the take-back's grace runs on the pool's clock too)
            await asyncio.sleep(0.01)
            clock.advance(0.1)
    gate.set()
    try:
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the lease's task still waits in its ROLLBACK, 5 s after the pool closed the connection"
    finally:
        task.cancel()
    error = task.exception()
    # (0.32: the connection is closed; before, asyncpg's check sees the
    # cancellation it never cleared: "another operation is cancelling".)
    assert isinstance(error, asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError), repr(error)
    async with pool.acquire() as fresh:
        assert await fresh.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("create_pool", [asyncpg.create_pool, safepool.create_pool], ids=["asyncpg", "safepool"])
async def test_a_rollback_waiting_for_a_cancel_when_the_server_ends_the_backend(
    pg_dsn: str, app_name: str, create_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same wait, ended by the server (``pg_terminate_backend``): asyncpg
    notices the loss. On asyncpg 0.29-0.31 its own pool leaves the task in
    its ROLLBACK (pinned: still waiting after 2 s); safepool's ends it."""
    gate = held_cancel_requests(monkeypatch)
    pool = await create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        task = await rollback_awaiting_cancellation(
            con, con._con if create_pool is asyncpg.create_pool else con._raw, pg_dsn
        )
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        done, _ = await asyncio.wait([task], timeout=2)
        gate.set()
        if create_pool is asyncpg.create_pool and asyncpg_version() < (0, 32):
            assert not done, "asyncpg's pool no longer leaves the ROLLBACK waiting"
            task.cancel()
            return
        assert done, "the lease's task still waits in its ROLLBACK, 2 s after the server ended its backend"
        assert isinstance(task.exception(), asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError), task
    finally:
        gate.set()
        pool.terminate()
