"""Review s61, hand-made mutation review of the runtime modules
(safepool/_runner.py, safepool/_workers.py, safepool/_reclaim.py): behaviour
no test caught when it was broken on purpose (one small edit at a time, the
tests that exercise the function run against it). Each test here fails
against the mutation named in its docstring and passes against the code as
it is. (The round before, review s60, covered safepool/_state.py:
tests/integration/test_review_s60_mutants.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from tests._util import (
    drive_io_timers,
    held_cancel_requests,
    release_resetting_on_server,
    sleeping_reset_connection_class,
    until_in_pg_sleep,
)

pytestmark = pytest.mark.asyncio


_SleepingReset = sleeping_reset_connection_class()


async def test_the_reset_watchdog_rearms_for_a_reset_younger_than_its_timeout(pg_dsn: str, app_name: str) -> None:
    """One watchdog timer serves every release's reset that runs with no
    limit (no reset_timeout, release timeout or command_timeout): armed by
    the first, it aborts the resets that have run DEFAULT_RESET_TIMEOUT
    (30 s) when it fires and re-arms for the oldest still younger. A reset
    that began while the timer was armed (here 20 s after the first) must
    be aborted in its turn, 30 s after its own start: else a silent network
    or a reset the server never finishes holds its slot (and its releasing
    task) for ever, or up to twice the bound.

    Mutation killed: ``Runner.check_resets`` no longer re-arms for a
    pending younger reset: the second release waited for the server's
    minute, its slot held. Found by the review too: the re-armed timer was
    set 30 s after the first fired, not after the younger reset's start (the
    second reset was aborted 40 s after it began). (The watchdog runs on
    the loop's time: here on the test's clock, to pin the instants.)"""
    clock = ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=2, max_size=2, clock=clock, connection_class=_SleepingReset,
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)
    admin = await asyncpg.connect(pg_dsn)
    first, second = await pool.acquire(), await pool.acquire()
    pids = [first.get_server_pid(), second.get_server_pid()]
    try:
        for con in (first, second):
            await con.fetchval("SELECT 1")  # dirty: each release resets
        release_first = asyncio.ensure_future(pool.release(first))
        await until_in_pg_sleep(pg_dsn, pids[0])  # its reset runs on the server: the watchdog is armed
        clock.advance(20.0)
        release_second = asyncio.ensure_future(pool.release(second))
        await until_in_pg_sleep(pg_dsn, pids[1])
        clock.advance(10.0)  # the first reset is 30 s old: aborted
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release_first, 5)
        assert not release_second.done()
        clock.advance(19.0)
        await asyncio.sleep(0.05)
        assert not release_second.done()  # (29 s old)
        clock.advance(1.0)  # the re-armed watchdog fires: the second is 30 s old
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release_second, 5)
        assert pool._runner.reset_watchdog is None  # nothing left to watch
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        await admin.close()
        pool.terminate()


async def test_a_finished_reset_is_no_longer_watched(pools: Any) -> None:
    """A release's reset with no limit is watched by the reset watchdog from
    its start; once it has finished, the connection is clean and idle (or
    leased again), and the watchdog must leave it alone: 30 s later it is
    an ordinary connection, maybe running the next lease's statement.

    Mutation killed: ``Runner.reset_done`` no longer clears
    ``holder.reset_since``: the watchdog, armed by the release, aborted
    the connection 30 s later under the next lease (its statement failed
    with ConnectionDoesNotExistError, and the pool reconnected). (The
    watchdog runs on the loop's time: here on the test's clock.)"""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    drive_io_timers(pool, clock)
    async with pool.acquire() as con:  # (no timeout: the release's reset has no budget)
        pid = con.get_server_pid()
        await con.fetchval("SELECT 1")  # dirty: the release resets, watched
    assert pool.stats().resets == 1
    async with pool.acquire(timeout=5) as con:
        clock.advance(30.0)  # when the watchdog armed by that reset fires
        assert await con.fetchval("SELECT 2") == 2
        assert con.get_server_pid() == pid
    assert pool.stats().connections_closed == 0



async def test_a_connect_planned_inside_a_connect_task_cancelled_from_outside_frees_its_place(pools: Any) -> None:
    """A program that cancels every task (at its exit, or a supervisor's
    cleanup) may cancel a pool task: here the connect opened for a waiting
    task. Its handler settles the books, and the core plans the next
    connect for the task still waiting; but a task spawned from a task
    cancelled from outside may never run (the loop shutting down), so the
    runner drops that connect and tells the core (``connect_cancelled``).
    The planned slot must not stay counted: the pool then serves again and
    closes.

    Mutation killed: ``Runner.drain`` drops such a ``Connect`` without
    ``state.connect_cancelled``: its slot stayed CONNECTING with no task,
    counted towards max_size for ever (max_size=1: no acquire was ever
    served again, and close() never returned)."""
    pool = await pools(min_size=0, max_size=1)
    waiting = asyncio.ensure_future(pool.acquire(timeout=1))
    for _ in range(3):
        await asyncio.sleep(0)
    [connect] = pool._runner.connect_tasks
    connect.cancel()  # from outside: not the pool's terminate()
    with pytest.raises(asyncio.CancelledError):
        await connect
    try:
        async with asyncio.timeout(3):
            async with pool.acquire(timeout=2) as con:
                assert await con.fetchval("SELECT 1") == 1
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    pool._state.check_invariants()
    assert pool.get_size() == 1
    await asyncio.wait_for(pool.close(), 5)



async def test_a_slot_the_watchdog_aborted_counts_until_its_cancel_request_was_delivered(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset watchdog aborts a reset still running on the server; the
    backend then gets a cancel request (``Runner.cancel_aborted``), and the
    slot counts towards max_size until it was delivered: before that the
    backend may still run its statement, and a replacement beside it would
    make max_size + 1 backends on the server (docs/design.md: "the pool
    never has more than max_size sockets"; docs/reliability.md).

    Mutation killed: ``Runner.close_slot`` no longer returns after
    spawning ``cancel_aborted``: the slot was freed at once, and a waiting
    task got a replacement while the old backend still slept."""
    import safepool._workers

    gate = held_cancel_requests(monkeypatch)
    # (The request's own bound, 2 s of real time, must not run out while
    # the test samples: held, it would free the slot as undeliverable.)
    monkeypatch.setattr(safepool._workers, "LOST_BACKEND_CANCEL_TIMEOUT", 30.0)
    try:
        async with release_resetting_on_server(pg_dsn, app_name) as (pool, _, clock, pid, release):
            clock.advance(30.0)  # the watchdog aborts the reset; its cancel request is held
            waiting = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0.2)
            # The old backend may still run: no replacement yet, and the
            # release (which returns once its connection is given up) waits.
            assert not waiting.done() and not release.done()
            assert pool.get_size() == 1
            gate.set()  # the cancel request goes out: the slot is freed
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
            again = await asyncio.wait_for(waiting, 5)
            assert again.get_server_pid() != pid
    finally:
        gate.set()
