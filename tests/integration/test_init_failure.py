"""An ``init=`` hook that raises on a new connection whose close is slow,
on a real server: the acquire gets the hook's error while that backend is
still there, and the pool never has more than ``max_size`` backends (the
next connect waits until the failed one's backend is gone)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
from tests._util import slow_close_connection_class, until

pytestmark = pytest.mark.asyncio


# A close slower than the tests' acquire timeouts (a server slow to answer
# the Terminate message).
SlowCloseConnection = slow_close_connection_class()


@pytest.mark.parametrize("waiters", [1, 3])
async def test_the_error_comes_first_and_the_backend_counts_until_gone(
    pg_dsn: str, app_name: str, server_count: Any, waiters: int
) -> None:
    failing = [True]

    async def init(con: Any) -> None:
        if failing:
            failing.pop()
            raise LookupError("init failed")

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, init=init, connection_class=SlowCloseConnection,
        server_settings={"application_name": app_name},
    )
    try:
        acquires = [asyncio.ensure_future(pool.acquire(timeout=0.2)) for _ in range(waiters)]
        # The hook's error is the first acquire's alone (asyncpg's acquire
        # connects for itself); the others wait for connects of their own,
        # which the closing backend holds back past their timeouts.
        with pytest.raises(LookupError, match="init failed"):
            await acquires[0]
        for acquire in acquires[1:]:
            with pytest.raises(safepool.PoolTimeoutError, match="closing=1"):
                await acquire
        # Raised before the close finished: its backend is still there,
        # counted by the pool (stats().closing), not by get_size().
        assert await server_count(app_name) == 1
        assert (pool.stats().closing, pool.get_size()) == (1, 0)

        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, await server_count(app_name))
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        try:
            async with pool.acquire(timeout=5) as con:
                assert await con.fetchval("SELECT 1") == 1
                assert pool.stats().closing == 0
        finally:
            done.set()
            await sampler
        assert peak == 1, f"{peak} backends at once with max_size=1"
        stats = pool.stats()
        assert (stats.connect_errors, stats.connections_opened, stats.connections_closed) == (1, 1, 0)
    finally:
        await pool.close()
    assert await server_count(app_name) == 0


async def test_a_timeout_behind_the_closing_connection_says_it_is_closing(
    pg_dsn: str, app_name: str, server_count: Any
) -> None:
    """max_size=1, the hook failed and its connection's close is slow: an
    acquire that times out meanwhile said "in use=0, idle=0, connecting=0
    ... no connection is leased", a pool that looked empty yet full. The
    message counts the closing connection that holds the place."""

    async def init(con: Any) -> None:
        raise LookupError("init failed")

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, init=init, connection_class=SlowCloseConnection,
        server_settings={"application_name": app_name},
    )
    try:
        with pytest.raises(LookupError):
            await pool.acquire(timeout=5)
        assert pool.stats().closing == 1
        with pytest.raises(safepool.PoolTimeoutError, match=r"connecting=0, closing=1, waiting=0") as caught:
            await pool.acquire(timeout=0.05)
        assert await server_count(app_name) <= 1
        assert "closing=" not in str(caught.value).split("closing=1", 1)[1]
        pool._state.check_invariants()
    finally:
        await pool.close()
    assert await server_count(app_name) == 0


async def test_a_connect_abandoned_by_terminate_reports_no_failure(
    pg_dsn: str, app_name: str, server_count: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """terminate() while init= runs, and the hook turns its cancellation
    into an error of its own: the connect was abandoned (not counted in
    connect_errors, connect_failures stays 0), yet the pool logged a
    WARNING "connect failed (...); 0 consecutive failures" and emitted a
    connect_failed event per connect, after its terminate()."""
    caplog.set_level("DEBUG", logger="safepool")
    entered = 0

    async def init(con: Any) -> None:
        nonlocal entered
        entered += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise LookupError("init interrupted") from None

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=2, init=init, server_settings={"application_name": app_name},
    )
    events: list[dict[str, Any]] = []
    pool.add_listener(events.append)
    acquires = [asyncio.ensure_future(pool.acquire(timeout=5)) for _ in range(2)]
    await until(lambda: entered == 2)  # both connects run the hook
    caplog.clear()
    pool.terminate()
    for acquire in acquires:
        with pytest.raises(safepool.PoolClosedError):
            await acquire
    # Until the abandoned connects' tasks have ended (where a failure would
    # be logged and its event queued), and one loop pass more (an event's
    # delivery is a loop callback).
    await until(lambda: not pool._runner.tasks)
    await asyncio.sleep(0)
    assert [e for e in events if e["event"] == "connect_failed"] == []
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == []
    assert pool.stats().connect_errors == 0
    pool._state.check_invariants()
    for _ in range(50):
        if await server_count(app_name) == 0:
            break
        await asyncio.sleep(0.02)
    assert await server_count(app_name) == 0


async def test_with_wait_on_connect_error_a_hook_that_always_fails_is_no_login_storm(pg_dsn: str) -> None:
    """wait_on_connect_error=True, one connection leased, a hook that fails
    on every new one, and a task waiting for a second: it waits on for the
    leased one (no acquire fails), so the next connect backs off as after
    any failure. Started at once instead, as when the hook's error fails
    its task, they made about 400 logins a second for as long as the task
    waited."""
    calls = 0

    async def init(con: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise LookupError("init failed")

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2, init=init, wait_on_connect_error=True)
    try:
        async with pool.acquire() as held:
            with pytest.raises(safepool.PoolTimeoutError):
                await pool.acquire(timeout=1)
            # Backoff(base=0.1, cap=2.0): attempts at 0, ~0.1, ~0.3, ~0.7 s
            # (half of each delay random: one or two more).
            assert 2 <= calls - 1 <= 7, f"{calls - 1} logins in 1 s"
            assert await held.fetchval("SELECT 1") == 1
            stats = pool.stats()
            assert stats.init_failing and stats.server_status == "up"
            pool._state.check_invariants()
    finally:
        await pool.close()


@pytest.mark.parametrize("options", [{"max_site_share": 0.5}, {"queue_policy": "adaptive"}], ids=str)
async def test_with_a_queue_policy_an_abandoned_connects_init_error_fails_no_other_task(
    pg_dsn: str, options: dict[str, Any]
) -> None:
    """max_size=1, the first acquire's connect is in init= (held at a gate)
    when a second acquire queues; the first is cancelled, then the hook
    raises. The second acquire waits on for a connect of its own and gets a
    connection, as without a queue policy and on asyncpg's pool
    (tests/compat/test_parity.py::test_an_init_failure_after_its_acquire_gave_up_fails_no_other_acquire).
    Before 2026-12-05, with a policy, it got the hook's error of a connect
    it never opened (a connect had no owner there, and a failed one failed
    the newest waiting task): each now has its trigger (``Slot.trigger``)."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    calls = 0

    async def init(con: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await gate.wait()
            raise LookupError("init failed")

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, init=init, **options)
    try:

        async def use() -> int:
            async with pool.acquire(timeout=5) as con:
                return int(await con.fetchval("SELECT 1"))

        first = asyncio.ensure_future(pool.acquire())
        await entered.wait()
        second = asyncio.ensure_future(use())
        await until(lambda: pool.stats().waiting == 2)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == 1
        assert calls == 2
        pool._state.check_invariants()
    finally:
        pool.terminate()
