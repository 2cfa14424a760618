"""Pool + runner + workers on a fake ServerConnection and the manual clock,
no database: cancellation at each await of acquire, release, reset, connect
and close; take-back after a lease timeout; setup failure; double cancel.
After each, the books must balance (``check_invariants``, sizes, no slot
lost or counted twice)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import safepool
from safepool import _reporting

from .fake import FakeServer
from .rig import Rig, make_rig, spin

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    made = await make_rig()
    yield made
    made.pool.terminate()
    await spin()
    made.pool._state.check_invariants()
    assert not made.server.open()


async def test_lease_round_trip_runs_the_reset(rig: Rig) -> None:
    con = await rig.lease()
    rig.books(size=1, in_use=1)
    query = asyncio.ensure_future(con.execute("SELECT 1"))
    await spin()
    rig.server.finish_statement()
    await query
    release = asyncio.ensure_future(rig.pool.release(con))
    await spin()
    assert rig.server.finish_statement() == "RESET ALL"
    await release
    rig.books(size=1, idle=1)


async def test_cancel_acquire_while_connecting(rig: Rig) -> None:
    task = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    assert rig.server.connects
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rig.server.finish_connect()  # the connect goes on for the pool
    await spin()
    rig.books(size=1, idle=1)


async def test_cancel_acquire_waiting_for_a_connection() -> None:
    rig = await make_rig(max_size=1)
    held = await rig.lease()
    waiter = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    assert rig.pool._state.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    rig.books(size=1, in_use=1)
    assert rig.pool._state.waiting == 0
    await rig.pool.release(held)  # no statement ran: handed on at once
    rig.books(size=1, idle=1)
    rig.pool.terminate()


async def test_cancel_after_grant_before_resume() -> None:
    """The waiter is granted a connection, then cancelled before its task
    resumes: the connection goes back, nothing is counted twice."""
    rig = await make_rig(max_size=1)
    held = await rig.lease()
    waiter = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    await rig.pool.release(held)  # grants it to the waiter (a Wake)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await spin()
    rig.books(size=1, idle=1)
    rig.pool.terminate()


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancel_release_during_inline_reset(rig: Rig, cancels: int) -> None:
    con = await rig.lease()
    query = asyncio.ensure_future(con.execute("SELECT 1"))
    await spin()
    rig.server.finish_statement()
    await query
    release = asyncio.ensure_future(rig.pool.release(con))
    await spin()
    assert rig.server.statements  # the reset is in flight, driven by the releasing task
    for _ in range(cancels):
        release.cancel()
        await spin(1)
    with pytest.raises(asyncio.CancelledError):
        await release
    rig.books(size=1, idle=0)  # still resetting: not handed on, not lost
    assert rig.pool._state.count(safepool.pool.SlotState.RESETTING) == 1
    assert rig.server.finish_statement() == "RESET ALL"  # a pool task finishes it
    await spin()
    rig.books(size=1, idle=1)
    assert not rig.server.terminated


async def test_failed_reset_closes_and_raises(rig: Rig) -> None:
    con = await rig.lease()
    query = asyncio.ensure_future(con.execute("SELECT 1"))
    await spin()
    rig.server.finish_statement()
    await query
    release = asyncio.ensure_future(rig.pool.release(con))
    await spin()
    rig.server.finish_statement(OSError("reset broke"))
    with pytest.raises(OSError, match="reset broke"):
        await release
    await spin()
    rig.books(size=0)


async def test_custom_reset_in_a_pool_task_cancelled_caller() -> None:
    calls: list[str] = []

    async def reset(con: Any) -> None:
        calls.append("reset")
        await con.execute("CUSTOM RESET")

    rig = await make_rig(reset=reset)
    con = await rig.lease()
    release = asyncio.ensure_future(rig.pool.release(con))
    await spin()
    release.cancel()
    with pytest.raises(asyncio.CancelledError):
        await release
    statements = [rig.server.finish_statement() for _ in range(len(rig.server.statements))]
    await spin()
    while rig.server.statements:  # asyncpg's own _reset() before the hook may send more
        statements.append(rig.server.finish_statement())
        await spin()
    assert "CUSTOM RESET" in statements
    rig.books(size=1, idle=1)
    rig.pool.terminate()


async def test_take_back_after_lease_timeout(rig: Rig) -> None:
    con = await rig.lease(lease_timeout=5)
    rig.clock.advance(6)
    await spin()
    assert rig.server.finish_statement() == "RESET ALL"  # the take-back's reset
    await spin()
    rig.books(size=1, idle=1)
    with pytest.raises(safepool.LeaseExpiredError):
        await con.execute("SELECT 1")
    await rig.pool.release(con)  # a no-op after the take-back
    rig.books(size=1, idle=1)


async def test_lease_timeout_none_means_no_limit() -> None:
    rig = await make_rig(lease_timeout=5)
    con = await rig.lease(lease_timeout=None)
    rig.clock.advance(60)
    await spin()
    rig.books(size=1, in_use=1)
    await rig.pool.release(con)
    rig.pool.terminate()


async def test_acquire_timeout_default_and_none() -> None:
    rig = await make_rig(max_size=1, acquire_timeout=2)
    held = await rig.lease()
    default = asyncio.ensure_future(rig.pool.acquire())  # the pool's acquire_timeout
    unlimited = asyncio.ensure_future(rig.pool.acquire(timeout=None))  # no limit
    await spin()
    rig.clock.advance(3)
    await spin()
    with pytest.raises(safepool.PoolTimeoutError):
        await default
    assert not unlimited.done()
    await rig.pool.release(held)
    con = await unlimited
    await rig.pool.release(con)
    rig.books(size=1, idle=1)
    rig.pool.terminate()


@pytest.mark.parametrize("error", [RuntimeError("setup failed"), asyncio.CancelledError()])
async def test_setup_failure_closes_the_connection(error: BaseException) -> None:
    async def setup(con: Any) -> None:
        raise error

    rig = await make_rig(setup=setup)
    task = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    rig.server.finish_connect()
    with pytest.raises(type(error)):
        await task
    await spin()
    rig.books(size=0)
    assert rig.server.closed or rig.server.terminated
    rig.pool.terminate()


async def test_connect_failure_reaches_the_waiter(rig: Rig) -> None:
    task = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    rig.server.finish_connect(ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError):
        await task
    await spin()
    rig.books(size=0)


@pytest_asyncio.fixture
async def paced_rig() -> AsyncIterator[Rig]:
    """A rig whose pool paces connects while they fail (``fail_fast=True``;
    its breaker opens only after three failures)."""
    made = await make_rig(fail_fast=True)
    yield made
    made.pool.terminate()
    await spin()
    made.pool._state.check_invariants()
    assert not made.server.open()


async def waiting_after_a_refused_connect(rig: Rig) -> asyncio.Future[Any]:
    """A first acquire's connect refused, then a second acquire, whose
    connect is under way: the second's future. Paced (``fail_fast``), that
    connect is the pool's probe, 10 ms later; otherwise the second's own,
    at once, as asyncpg's acquire connects for itself."""
    first = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    rig.server.finish_connect(ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError):
        await first
    second = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    if rig.pool.options.fail_fast:
        assert not rig.server.connects, "retried before the backoff ended"
        rig.clock.advance(0.05)  # (nothing listening: retried within 10 ms)
        await spin()
    assert len(rig.server.connects) == 1
    return second


async def test_a_probe_unanswered_for_the_hedge_delay_gets_another_beside_it(paced_rig: Rig) -> None:
    """While connects fail, a probe that goes unanswered for
    Backoff.hedge_after (0.1 s) is presumed lost (a black hole): the pool's
    timer starts another beside it, up to max_size (2) under way, and the
    first to answer serves the waiter; the other joins the idle stack."""
    rig = paced_rig
    second = await waiting_after_a_refused_connect(rig)
    # (The probe started at 0.005-0.01 s: the hedge is due 0.1 s after it.)
    rig.clock.advance(0.04)
    await spin()
    assert len(rig.server.connects) == 1, "hedged before hedge_after"
    rig.clock.advance(0.03)
    await spin()
    assert len(rig.server.connects) == 2
    rig.clock.advance(10.0)
    await spin()
    assert len(rig.server.connects) == 2  # max_size under way: no more
    rig.server.finish_connect()
    rig.server.finish_connect()
    await spin()
    con = await second
    rig.books(size=2, in_use=1)
    await rig.pool.release(con)
    rig.pool.terminate()


@pytest.mark.parametrize("paced", [False, True])
async def test_a_hedge_that_answers_first_serves_the_waiting_task(paced: bool) -> None:
    """The probe (unpaced: the task's own connect) is lost (a black hole),
    the hedge beside it answers: the one waiting task gets the hedge's
    connection at once, not after the lost probe's timeout (it went idle,
    and the task waited on)."""
    rig = await make_rig(fail_fast=paced)
    second = await waiting_after_a_refused_connect(rig)
    rig.clock.advance(0.12)
    await spin()
    assert len(rig.server.connects) == 2
    lost, hedge = rig.server.connects
    rig.server.connects.remove(hedge)
    hedge.set_result(None)
    await spin()
    assert second.done(), "the task waits on the lost probe"
    con = second.result()
    rig.server.finish_connect()  # (the lost probe answers late: it goes idle)
    await spin()
    rig.books(size=2, in_use=1)
    await rig.pool.release(con)
    rig.pool.terminate()


@pytest.mark.parametrize("paced", [False, True])
async def test_a_waiter_after_a_connect_failure_gets_the_next_attempt(paced: bool) -> None:
    """After a failed connect, the next acquire connects at once (asyncpg's
    way) or, paced (``fail_fast``), waits out the backoff: the pool's timer
    must be armed for the retry, or the waiter waits forever (asyncpg's
    test_pool_exception_in_setup_and_init hung so once)."""
    rig = await make_rig(fail_fast=paced)
    second = await waiting_after_a_refused_connect(rig)
    rig.server.finish_connect()
    await spin()
    con = await second
    rig.books(size=1, in_use=1)
    await rig.pool.release(con)
    rig.books(size=1, idle=1)
    rig.pool.terminate()


async def test_terminate_while_connecting(rig: Rig) -> None:
    task = asyncio.ensure_future(rig.pool.acquire())
    await spin()
    rig.pool.terminate()
    with pytest.raises(safepool.PoolClosedError):
        await task
    await spin()
    rig.pool._state.check_invariants()
    assert rig.pool._state.size == 0


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancel_close_terminates(cancels: int) -> None:
    """close() waits for a lease; cancelled (once or twice), the pool is
    terminated: every connection terminated, nothing left counted."""
    rig = await make_rig()
    con = await rig.lease()
    closing = asyncio.ensure_future(rig.pool.close())
    await spin()
    for _ in range(cancels):
        closing.cancel()
        await spin(1)
    with pytest.raises(asyncio.CancelledError):
        await closing
    await spin()
    rig.pool._state.check_invariants()
    assert rig.pool._state.size == 0
    assert not rig.server.open()
    assert rig.server.terminated and not rig.server.closed  # terminated, not an awaited close
    del con


async def test_close_releases_and_closes_gracefully() -> None:
    rig = await make_rig()
    con = await rig.lease()
    closing = asyncio.ensure_future(rig.pool.close())
    await spin()
    assert not closing.done()
    await rig.pool.release(con)
    await closing
    rig.pool._state.check_invariants()
    assert rig.pool._state.size == 0
    assert rig.server.closed and not rig.server.terminated


async def test_max_queries_closes_on_release() -> None:
    rig = await make_rig(max_queries=1)
    con = await rig.lease()
    query = asyncio.ensure_future(con.execute("SELECT 1"))
    await spin()
    rig.server.finish_statement()
    await query
    await rig.pool.release(con)
    rig.books(size=0)
    assert rig.server.closed
    rig.pool.terminate()


# terminate() in the same loop iteration as the action that spawned a pool
# task: a task cancelled before its first step never runs its cleanup
# (close_connection's slot_closed, reset_slot's settle of the releasing
# caller's future, connect_slot's connect_cancelled), so terminate_all
# settles those itself. Found by tests/io/test_sweep.py (close_with_leases-cancel-7).


async def test_terminate_right_after_expire_closes_every_connection() -> None:
    server = FakeServer(suspending=True)
    rig = await make_rig(server, min_size=2, max_size=2)
    await rig.pool.expire_connections()  # both idle connections: a close task each
    rig.pool.terminate()  # before those tasks ran
    await spin()
    try:
        assert not server.open(), "connections left open on the server"
        assert rig.pool._state.size == 0, [slot.state.value for slot in rig.pool._state.slots()]
    finally:
        for con in server.open():
            con.terminate()


async def test_terminate_before_a_custom_reset_runs_lets_release_return() -> None:
    server = FakeServer(suspending=True)

    async def reset(con: Any) -> None:
        await con.execute("CUSTOM RESET")

    rig = await make_rig(server, min_size=1, max_size=1, reset=reset)
    con = await rig.pool.acquire()
    release = asyncio.ensure_future(rig.pool.release(con))
    await asyncio.sleep(0)  # release() spawned the reset task and waits for it
    rig.pool.terminate()  # before the reset task ran
    await spin()
    try:
        assert release.done(), "release() waits for ever for a reset that will never run"
    finally:
        release.cancel()


async def test_terminate_before_a_connect_runs_frees_the_slot() -> None:
    server = FakeServer(suspending=True)
    rig = await make_rig(server, min_size=0, max_size=1)
    acquire = asyncio.ensure_future(rig.pool.acquire())
    await asyncio.sleep(0)  # acquire() queued a connect task
    rig.pool.terminate()  # before the connect task ran
    with pytest.raises(safepool.PoolClosedError):
        await acquire
    await spin()
    assert rig.pool._state.size == 0, [slot.state.value for slot in rig.pool._state.slots()]


async def test_failed_connects_are_logged_at_warning_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """Unpaced, a server that is down fails a connect per acquire, as on
    asyncpg's pool: the first failure is a WARNING, then one a second
    (``CONNECT_WARNING_INTERVAL``), the others DEBUG, each with the count
    of failures in a row; every caller still gets its own error."""
    rig = await make_rig()
    caplog.set_level(logging.DEBUG, logger="safepool")

    async def refused_acquire() -> None:
        task = asyncio.ensure_future(rig.pool.acquire())
        await spin()
        rig.server.finish_connect(ConnectionRefusedError("refused"))
        with pytest.raises(ConnectionRefusedError):
            await task

    def connect_records() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if getattr(r, "event", None) == "connect_failed"]

    for _ in range(5):
        await refused_acquire()
        rig.clock.advance(0.1)
    assert [level for level, _ in connect_records()] == [logging.WARNING] + [logging.DEBUG] * 4
    rig.clock.advance(_reporting.CONNECT_WARNING_INTERVAL)
    await refused_acquire()
    level, message = connect_records()[-1]
    assert level == logging.WARNING and message.endswith("6 consecutive failures"), message
    rig.pool.terminate()
