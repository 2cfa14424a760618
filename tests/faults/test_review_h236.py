"""Review h236: the asyncpg < 0.32 fixes of review h234 (``_internals.
wait_for_cancellation``'s wait for a lost connection, ``Holder.
_proxy_collected``'s dead setup proxy), attacked.

Run on an older asyncpg with an overlay first on PYTHONPATH, e.g.
``PYTHONPATH=/tmp/apg029:$PWD .venv/bin/python -m pytest tests/faults/test_review_h236.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import asyncpg
import pytest
from asyncpg import connect_utils

import safepool
import safepool._workers
from safepool import _internals

from ._harness import loop_errors
from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

OLD_ASYNCPG = not _internals.HAS_POOL_HOLDER


async def _collect() -> None:
    for _ in range(3):
        await asyncio.sleep(0)
        gc.collect()


def _failing_cancel_requests(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """asyncpg's cancel requests wait at a gate (``entered`` set once one
    does), then fail with ConnectionRefusedError (the server unreachable for
    the request's new connection)."""
    gate, entered = asyncio.Event(), asyncio.Event()

    async def refused(**kwargs: Any) -> None:
        entered.set()
        await gate.wait()
        raise ConnectionRefusedError("cancel request refused (test)")

    monkeypatch.setattr(connect_utils, "_cancel", refused)
    return gate, entered


async def _active(admin: asyncpg.Connection, app_name: str) -> None:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        " AND state = 'active' AND query LIKE 'SELECT pg_sleep%'"
    )
    async with asyncio.timeout(10):
        while not await admin.fetchval(sql, app_name):
            await asyncio.sleep(0.005)


async def test_a_failed_cancel_request_after_a_spent_release_budget_leaves_no_task_exception(
    running: Cluster, app_name: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease's query is cancelled and released at once with a short
    budget; asyncpg's cancel request is held, and fails once the budget is
    spent (the pool still waits for the answer: CANCEL_ANSWER_GRACE)."""
    monkeypatch.setattr(safepool._workers, "CANCEL_ANSWER_GRACE", 30.0)
    pool = await safepool.create_pool(
        running.dsn(), min_size=0, max_size=1, server_settings={"application_name": app_name}
    )
    try:
        with loop_errors() as errors:
            gate, entered = _failing_cancel_requests(monkeypatch)
            con = await pool.acquire()
            query = asyncio.ensure_future(con.execute("SELECT pg_sleep(5)"))
            await _active(admin, app_name)
            query.cancel()
            await asyncio.wait_for(entered.wait(), 10)  # asyncpg's cancel request, held
            with pytest.raises(TimeoutError):
                await pool.release(con, timeout=0.05)
            gate.set()  # the cancel request fails
            with contextlib.suppress(BaseException):
                await query
            async with pool.acquire(timeout=10) as again:
                assert await again.fetchval("SELECT 1") == 1
            await asyncio.wait_for(pool.close(), 10)
            del con, query
            await _collect()
        reported = [f"{e.get('message')}: {e.get('exception')!r}" for e in errors]
        assert not reported, reported
    finally:
        pool.terminate()


async def test_a_connection_lost_during_its_releases_cancel_wait_hands_listeners_the_proxy(running: Cluster) -> None:
    """Fixed in s73: the release attaches the released proxy
    (``_internals.attach_released``) while a pool task resets, as asyncpg's
    release detaches its proxy after the reset."""
    from ._proxy import FaultProxy

    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(running.dsn(port=proxy.port), min_size=0, max_size=1, command_timeout=0.3)
        try:
            con = await pool.acquire()
            called: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            con.add_termination_listener(lambda c: called.done() or called.set_result(c))
            proxy.blackhole = True
            with pytest.raises(TimeoutError):
                await con.fetchval("SELECT 1")  # command_timeout; asyncpg's cancel request goes unanswered
            release = asyncio.ensure_future(pool.release(con))
            async with asyncio.timeout(5):  # the release's reset is under way (a pool task's)
                while not pool.stats().resetting:
                    await asyncio.sleep(0.005)
            proxy.heal()  # the connection is reset (RST)
            got = await asyncio.wait_for(called, 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(release, 5)
            assert got is con, f"the termination listener got {type(got).__name__}, not the lease's proxy"
            # (Its close sends the lost backend a cancel request: awaited,
            # so the proxy does not accept it after the test.)
            await asyncio.wait_for(pool.close(), 10)
        finally:
            pool.terminate()


class _RecordingConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class that records the termination listeners added
    to it (a program's bookkeeping, or a wrapper's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[Any] = []

    def add_termination_listener(self, callback: Any) -> None:
        self.added.append(callback)
        super().add_termination_listener(callback)


async def test_a_release_waiting_for_a_cancel_answer_registers_nothing_on_the_connection_class(
    running: Cluster,
) -> None:
    from ._proxy import FaultProxy

    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=1, command_timeout=0.3,
            connection_class=_RecordingConnection,
        )
        try:
            con = await pool.acquire()
            raw = con._con
            proxy.blackhole = True
            with pytest.raises(TimeoutError):
                await con.fetchval("SELECT 1")  # command_timeout; asyncpg's cancel request goes unanswered
            release = asyncio.ensure_future(pool.release(con))
            async with asyncio.timeout(5):
                while not pool.stats().resetting:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # (the reset's pool task reaches the wait: no event to tell it)
            proxy.heal()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(release, 5)
            async with pool.acquire(timeout=5) as again:  # (the pool's own cancel request is over)
                assert await again.fetchval("SELECT 1") == 1
            assert [getattr(cb, "__qualname__", cb) for cb in raw.added] == []
        finally:
            pool.terminate()
