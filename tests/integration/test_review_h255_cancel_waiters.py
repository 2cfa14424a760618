"""Review h255: ``_internals.complete_cancel_waiters`` (asyncpg < 0.32).

It finds the protocol's ``cancel_sent_waiter`` and ``cancel_waiter`` among
its garbage-collector referents (the fields after the ConnectionSettings
object) and sets them done. Pinned here:

- the shape it relies on holds in each protocol state (idle, a statement
  running, asyncpg's cancellation under way): the two futures it completes
  are the cancellation's, never the query's own ``waiter`` (completing that
  one would return None to a call: a write reported done);
- called on a connection whose statement still runs, it leaves that
  statement's outcome alone (the call gets its real result);
- once the pool aborted a connection under a cancellation, asyncpg's own
  ``_cancel`` task, which finishes later, sets nothing twice (no
  InvalidStateError in the loop's handler, no task left pending);
- a no-op on asyncpg 0.32 (which completes them itself).

Run on the overlays too (PYTHONPATH=/tmp/apg029:$PWD ...) and with
``--loop uvloop``."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg
import pytest

import safepool._internals as _pg

from .._util import asyncpg_version, held_cancel_requests, rollback_awaiting_cancellation, until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio


def _after_settings(protocol: Any) -> list[Any]:
    settings = protocol.get_settings()
    fields = gc.get_referents(protocol)
    at = next(i for i, field in enumerate(fields) if field is settings)
    return fields[at + 1:at + 5]


def _before_0_32() -> None:
    if asyncpg_version() >= (0, 32):
        pytest.skip("asyncpg 0.32 completes the cancellation futures itself")


class _Handler:
    """The loop's exception handler calls, while installed."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        self.calls.append(context)


async def test_shape_idle_running_and_cancelling(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _before_0_32()
    con = await asyncpg.connect(pg_dsn)
    gate = held_cancel_requests(monkeypatch)
    try:
        protocol = con._protocol
        idle = _after_settings(protocol)
        assert idle[:3] == [None, None, None] and callable(idle[3]), idle

        pid = con.get_server_pid()
        call = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(10)"))
        await until_in_pg_sleep(pg_dsn, pid)
        running = _after_settings(protocol)
        assert running[0] is None and running[1] is None, running
        assert isinstance(running[2], asyncio.Future) and not running[2].done(), running

        call.cancel()  # asyncpg cancels the statement: its request held
        await until(lambda: protocol._is_cancelling())
        cancelling = _after_settings(protocol)
        assert all(isinstance(f, asyncio.Future) for f in cancelling[:2]), cancelling
        assert cancelling[0] is not cancelling[1]
        assert not any(f.done() for f in cancelling[:2])
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        gate.set()
        con.terminate()


async def test_an_open_connections_running_statement_keeps_its_outcome(pg_dsn: str) -> None:
    """Even where it should never be called (an open connection), it leaves
    the query's waiter alone: the call gets its own result, not None."""
    _before_0_32()
    con = await asyncpg.connect(pg_dsn)
    try:
        pid = con.get_server_pid()
        call = asyncio.ensure_future(con.fetchval("SELECT 42 FROM pg_sleep(0.5)"))
        await until_in_pg_sleep(pg_dsn, pid)
        _pg.complete_cancel_waiters(con._protocol)
        assert await asyncio.wait_for(call, 10) == 42
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await con.close()


async def test_abort_under_a_cancellation_then_asyncpgs_own_cancel_finishes(
    pools: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool aborts (``_internals.terminate``) a connection of its own
    (its termination listener completes the futures: ``attach_holder``)
    while asyncpg's cancel request is held and a ROLLBACK awaits the
    cancellation: the ROLLBACK ends; asyncpg's ``_cancel`` task, let through
    afterwards, finds its futures done and sets nothing again."""
    _before_0_32()
    loop = asyncio.get_running_loop()
    handler = _Handler()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(handler)
    gate = held_cancel_requests(monkeypatch)
    pool = await pools(min_size=0, max_size=1)
    lease = await pool.acquire()
    con = lease._raw
    try:
        task = await rollback_awaiting_cancellation(lease, con, pg_dsn)
        protocol = con._protocol
        waiters = _after_settings(protocol)[:2]
        _pg.terminate(con)
        assert con.is_closed()
        assert all(f.done() for f in waiters)
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the ROLLBACK still waits after the abort"
        assert isinstance(task.exception(), asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError), task
        gate.set()
        await until(lambda: not con._cancellations)  # asyncpg's _cancel task has finished
        for _ in range(5):
            await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
        assert handler.calls == [], handler.calls
    finally:
        gate.set()
        loop.set_exception_handler(previous)
        con.terminate()


async def test_a_no_op_on_0_32_and_without_a_protocol(pg_dsn: str) -> None:
    _pg.complete_cancel_waiters(None)
    _pg.complete_cancel_waiters(object())  # (no get_settings(): nothing done)
    con = await asyncpg.connect(pg_dsn)
    try:
        _pg.complete_cancel_waiters(con)  # (a Connection: its settings are not among its own referents)
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await con.close()
