"""Review h253: on asyncpg 0.29-0.31 a lease's task cancelled inside
``async with con.transaction()`` hangs for good in the transaction's
ROLLBACK when the pool takes the lease back (``lease_timeout``) and closes
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
pending, with nothing left to answer them (safepool/_internals.py:348-352
says as much, and only stops *safepool* waiting on them). Whatever the
lease's task awaits on them then waits for ever.

Deterministic here: asyncpg's cancel request is held (the server never
answers the cancel while the ROLLBACK waits), and the pool's grace for the
answer is short, so the take-back gives up and aborts the connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
import safepool._workers

from .._util import asyncpg_version, held_cancel_requests, until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio


@pytest.mark.xfail(
    asyncpg_version() < (0, 32),
    strict=True,
    reason=(
        "asyncpg 0.29-0.31: the pool's take-back aborts the connection (safepool/_internals.py:342 "
        "terminate(), via _reclaim.py:277's 'closing it') without completing the protocol's pending "
        "cancel_waiter/cancel_sent_waiter, as 0.32's abort()/connection_lost do; the lease's ROLLBACK "
        "awaiting cancel_waiter hangs for good"
    ),
)
async def test_a_rollback_waiting_for_a_cancel_ends_when_the_pool_takes_the_lease_back(
    pools: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = safepool.ManualClock()
    pool = await pools(min_size=0, max_size=1, clock=clock, reset_timeout=0.3)
    con = await pool.acquire(lease_timeout=1.0)
    raw = con._raw
    pid = con.get_server_pid()

    async def in_transaction() -> None:
        async with con.transaction():
            await con.execute("SELECT pg_sleep(10)")

    task = asyncio.ensure_future(in_transaction())
    await until_in_pg_sleep(pg_dsn, pid)
    gate = held_cancel_requests(monkeypatch)
    monkeypatch.setattr(safepool._workers, "CANCEL_ANSWER_GRACE", 0.2)
    task.cancel()  # asyncpg cancels the statement (its request held), then the ROLLBACK awaits the answer
    await until(lambda: raw._protocol._is_cancelling())
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert not task.done()
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
