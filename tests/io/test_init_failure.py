"""An ``init=`` hook that raises on the connection an acquire opened: the
waiting task gets the hook's error as soon as the hook fails (asyncpg's
acquire raises it even when the close after it outlasts the acquire's
``timeout``), while the pool closes that connection in a task of its own,
its slot counted towards ``max_size`` until the backend is gone. On the
fake server and the manual clock, with a close that waits for the test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
from safepool import ManualClock, _workers
from safepool._state import SlotState

from .fake import FakeConnection, FakeServer
from .rig import Rig, make_rig, spin

pytestmark = pytest.mark.asyncio


class InitFailed(LookupError):
    pass


class FailingInit:
    """``init=`` that raises on its first ``times`` connections (after
    ``gate``, if given, resolves); the close of each such connection then
    waits until :meth:`finish_close` (cancelled: the worker terminates)."""

    def __init__(self, times: int = 1, gate: asyncio.Future[None] | None = None, lose: bool = False) -> None:
        self.times = times
        self.gate = gate
        self.lose = lose
        self.closes: list[asyncio.Future[None]] = []
        self.failed: list[FakeConnection] = []

    async def __call__(self, con: FakeConnection) -> None:
        if not self.times:
            return
        self.times -= 1
        if self.gate is not None:
            await self.gate
        if self.lose:
            con.terminate()  # the connection died in the hook: nothing to close
            raise InitFailed("init failed")
        close_gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closes.append(close_gate)
        self.failed.append(con)
        original = con.close

        async def slow_close(*, timeout: float | None = None) -> None:
            await close_gate
            await original(timeout=timeout)

        con.close = slow_close  # type: ignore[method-assign]
        raise InitFailed("init failed")

    def finish_close(self) -> None:
        self.closes.pop(0).set_result(None)


def closing(rig: Rig) -> int:
    state = rig.pool._state
    state.check_invariants()
    return state.count(SlotState.CLOSING)


async def hook_ran(init: FailingInit, timeout: float = 60) -> tuple[Rig, asyncio.Future[Any]]:
    """A pool of one (``max_size=1``) whose first acquire (its ``timeout``,
    seconds) had a connection opened and ``init`` run on it: the rig and
    the acquire's task."""
    rig = await make_rig(max_size=1, init=init)
    task = asyncio.ensure_future(rig.pool.acquire(timeout=timeout))
    await spin()
    rig.server.finish_connect()
    await spin()
    return rig, task


async def settled_once_closed(rig: Rig, init: FailingInit) -> None:
    """The connection ``init`` failed on, still closing, closes: the pool
    is empty and its books agree; then it is terminated."""
    assert closing(rig) == 1
    init.finish_close()
    await spin()
    rig.books(size=0)
    rig.pool.terminate()


async def test_the_waiter_gets_the_error_while_the_connection_closes() -> None:
    init = FailingInit()
    rig, task = await hook_ran(init)
    assert task.done(), "the waiter waits for the close of the connection init= failed on"
    with pytest.raises(InitFailed):
        await task
    state = rig.pool._state
    # The backend is still there, counted towards max_size, not in get_size()
    # (asyncpg's holder never got the connection).
    assert (closing(rig), state.size, rig.pool.get_size()) == (1, 1, 0)
    assert len(rig.server.open()) == 1
    stats = rig.pool.stats()
    assert (stats.closing, stats.connect_errors, stats.connections_opened, stats.connections_closed) == (1, 1, 0, 0)

    # The next acquire waits for it to go: max_size=1, and it is a backend.
    second = asyncio.ensure_future(rig.pool.acquire(timeout=60))
    rig.clock.advance(5)  # (no backoff after an init= failure: the close alone holds it)
    await spin()
    assert not rig.server.connects and not second.done()
    init.finish_close()
    await spin()
    assert rig.server.closed == init.failed and not rig.server.terminated  # closed gracefully
    assert len(rig.server.connects) == 1, "no connect once the backend was gone"
    rig.server.finish_connect()
    await spin()
    con = await second
    rig.books(size=1, in_use=1)
    stats = rig.pool.stats()
    assert (stats.connections_opened, stats.connections_closed, stats.closing) == (1, 0, 0)
    await rig.pool.release(con)
    rig.pool.terminate()


async def test_the_task_the_connect_was_for_fails_the_others_wait_on() -> None:
    """max_size=2, one connection leased: the connect opened for the first
    waiter fails in init=; it gets the error at once, the second waits on
    for the leased connection, and no connect replaces the closing one
    meanwhile."""
    init = FailingInit()
    rig = await make_rig(max_size=2, init=init)
    init.times = 0
    held = await rig.lease()
    init.times = 1
    first = asyncio.ensure_future(rig.pool.acquire(timeout=60))
    await spin()
    second = asyncio.ensure_future(rig.pool.acquire(timeout=60))
    await spin()
    assert len(rig.server.connects) == 1  # max_size: one connect, the first waiter's
    rig.server.finish_connect()
    await spin()
    assert first.done() and not second.done()
    with pytest.raises(InitFailed):
        await first
    assert closing(rig) == 1 and rig.pool._state.size == 2
    rig.clock.advance(5)
    await spin()
    assert not rig.server.connects, "a connect beside the closing backend: max_size exceeded"
    await rig.pool.release(held)
    con = await second
    assert con is not None
    init.finish_close()
    await spin()
    rig.books(size=1, in_use=1)
    await rig.pool.release(con)
    rig.pool.terminate()


async def test_only_the_task_whose_connect_failed_gets_the_hook_error() -> None:
    """max_size=1, nothing else open, three tasks waiting: the first's
    connect fails in init=, and only the first gets the error (asyncpg's
    acquire opens a connection of its own and raises its hook's error);
    the second's connect starts once the failed connection is closed, at
    once (no backoff: the server answered), and the third gets that
    connection on its release."""
    init = FailingInit()
    rig = await make_rig(max_size=1, init=init)
    tasks = [asyncio.ensure_future(rig.pool.acquire(timeout=60)) for _ in range(3)]
    await spin()
    assert len(rig.server.connects) == 1
    rig.server.finish_connect()
    await spin()
    assert [task.done() for task in tasks] == [True, False, False]
    with pytest.raises(InitFailed):
        await tasks[0]
    assert not rig.server.connects, "a connect beside the closing backend"
    init.finish_close()
    await spin()
    assert len(rig.server.connects) == 1, "the next task's connect waited for a backoff"
    rig.server.finish_connect()
    await spin()
    con = await tasks[1]
    assert not tasks[2].done()
    await rig.pool.release(con)
    await spin()
    await rig.pool.release(await tasks[2])
    rig.books(size=1, idle=1)
    stats = rig.pool.stats()
    assert (stats.connect_errors, stats.connections_opened, stats.init_failing) == (1, 1, False)
    rig.pool.terminate()


async def test_a_waiter_cancelled_while_init_runs() -> None:
    """Its connect goes on (a pool task); the hook's error then reaches
    nobody, and the connection closes, counted until it is gone."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    init = FailingInit(gate=gate)
    rig, task = await hook_ran(init)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set_result(None)
    await spin()
    assert closing(rig) == 1 and rig.pool._state.waiting == 0
    init.finish_close()
    await spin()
    rig.books(size=0)
    assert rig.server.closed == init.failed
    rig.pool.terminate()


async def test_a_waiter_whose_timeout_ran_out_before_the_hook_failed() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    init = FailingInit(gate=gate)
    rig, task = await hook_ran(init, timeout=1)
    rig.clock.advance(1)
    await spin()
    with pytest.raises(safepool.PoolTimeoutError):
        await task
    gate.set_result(None)
    await spin()
    await settled_once_closed(rig, init)


async def test_close_waits_for_the_connection_init_failed_on() -> None:
    """close() while init= runs: the waiter gets PoolClosedError; the hook
    fails within the connect's grace, and close() returns once that
    connection is closed (gracefully), not before."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    init = FailingInit(gate=gate)
    rig, task = await hook_ran(init)
    closing_pool = asyncio.ensure_future(rig.pool.close())
    await spin()
    with pytest.raises(safepool.PoolClosedError):
        await task
    gate.set_result(None)
    await spin()
    assert closing(rig) == 1 and not closing_pool.done()
    init.finish_close()
    await asyncio.wait_for(closing_pool, 5)
    assert rig.pool._state.size == 0
    assert not rig.server.open() and rig.server.closed == init.failed and not rig.server.terminated


async def test_terminate_aborts_the_connection_init_failed_on() -> None:
    init = FailingInit()
    rig, task = await hook_ran(init)
    with pytest.raises(InitFailed):
        await task
    assert closing(rig) == 1
    rig.pool.terminate()
    await spin()
    rig.pool._state.check_invariants()
    assert rig.pool._state.size == 0
    assert not rig.server.open() and rig.server.terminated == init.failed


async def test_an_init_that_lost_its_connection_frees_the_slot_at_once() -> None:
    """A connection that died in the hook has no backend left to close:
    the slot is freed with the error (the server's failure, as any connect's)."""
    init = FailingInit(lose=True)
    rig, task = await hook_ran(init)
    with pytest.raises(InitFailed):
        await task
    assert closing(rig) == 0
    rig.books(size=0)
    assert not rig.pool.stats().init_failing
    rig.pool.terminate()


async def test_create_pool_raises_the_init_error_once_its_connection_is_closed() -> None:
    """Pool creation's first connect raises to the caller, as asyncpg's
    create_pool(): its failed connection is closed first."""
    server = FakeServer()
    server.auto_connect = True
    init = FailingInit()
    creating = asyncio.ensure_future(safepool.create_pool(
        connect=server.connect, connection_class=FakeConnection, clock=ManualClock(),
        min_size=1, max_size=1, init=init,
    ))
    await spin()
    assert init.closes and not creating.done(), "create_pool() raised before the close"
    init.finish_close()
    with pytest.raises(InitFailed):
        await creating
    assert server.closed == init.failed and not server.open()


async def test_a_failed_connection_a_subclass_caught_is_not_left_open() -> None:
    """``ConnectAttempt.left_open``: handed over only with the very error
    it was left with; otherwise (a Pool subclass's _get_new_connection()
    caught it) terminated."""
    server = FakeServer()
    for raised_same, returned in ((True, True), (False, False)):
        con = FakeConnection(server)
        server.connections.append(con)
        attempt = _workers.ConnectAttempt(close_later=True)
        error = InitFailed("init failed")
        attempt.connection, attempt.error = con, error
        got: Any = attempt.left_open(error if raised_same else InitFailed("another"))
        assert (got is con) is returned
        assert con.is_closed() is not returned
        assert attempt.connection is None and attempt.error is None
        con.terminate()
