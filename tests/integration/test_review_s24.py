"""Hostile review of 60077d9: the queue wait inlined into ``Leaser.acquire``
(no ``wait_for_connection`` frame), ``PoolState.claim``'s and ``_hand_on``'s
slot moves and lease opening inlined, ``AutoResetProxy.__init__`` setting the
proxy fields itself. Behaviour must be what it was at 8da8a3d; these tests
pass on both commits (but for the source guard on the inlined proxy fields,
which only the new code has).

On a real PostgreSQL, on asyncio's loop and uvloop (each scenario in its own
``asyncio.Runner``, as in test_review_s21.py). The window between the grant
and the waiting task resuming is opened exactly by holding back the task's
wake-up callback on its queue future (:class:`Gate`), not by timing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import re
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest
import uvloop

import safepool
from safepool import ManualClock
from safepool._autoreset import AutoResetProxy
from safepool._state import Waiter, WaiterState
from safepool.proxy import PoolConnectionProxy
from tests._util import pool_and_admin, until

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
STYLES = ["cancel_once", "cancel_twice", "timeout", "wait_for", "anyio_scope"]


def _run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 30))  # type: ignore[arg-type]


def _pool_and_admin(pg_dsn: str, app_name: str, **options: Any) -> Any:
    """tests/_util.py's pool_and_admin, the pool's sessions named ``app_name``
    (so pg_stat_activity counts this test's backends only)."""
    return pool_and_admin(pg_dsn, server_settings={"application_name": app_name}, **options)


async def _backends(admin: Any, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


async def _acquire(pool: Any, **options: Any) -> Any:
    """pool.acquire() as a coroutine (create_task takes no other awaitable)."""
    return await pool.acquire(**options)


def _queued(pool: Any) -> list[Waiter]:
    return [w for w in pool._state._waiters if w.state is WaiterState.WAITING]


def _task_waiting_on(future: Any) -> asyncio.Task[Any]:
    [task] = [t for t in asyncio.all_tasks() if getattr(t, "_fut_waiter", None) is future]
    return task


class Gate:
    """Hold back the wake-up of the task awaiting ``future``: once the pool
    grants it a connection (resolves the future), the task resumes only
    when :meth:`open` is called. Until then it is "granted, not resumed"."""

    def __init__(self, future: Any) -> None:
        [(wakeup, context)] = future._callbacks  # the awaiting task's wake-up, alone
        assert future.remove_done_callback(wakeup) == 1
        self.future, self.wakeup, self.context = future, wakeup, context
        self.fired = asyncio.Event()
        future.add_done_callback(lambda _: self.fired.set())

    def open(self) -> None:
        asyncio.get_running_loop().call_soon(self.wakeup, self.future, context=self.context)


async def _queued_acquire(pool: Any, style: str, handles: dict[str, Any], wait_for_timeout: float) -> str:
    """Acquire (it queues), as a caller cancelled in ``style`` would; return
    "acquired" (then released), or "cancelled" (CancelledError/TimeoutError
    swallowed here: the caller saw it)."""
    try:
        if style in ("cancel_once", "cancel_twice"):
            con = await pool.acquire()
        elif style == "timeout":
            async with asyncio.timeout(None) as cm:
                handles["cm"] = cm
                con = await pool.acquire()
        elif style == "wait_for":
            con = await asyncio.wait_for(pool.acquire(), wait_for_timeout)
        else:
            with anyio.CancelScope() as scope:
                handles["scope"] = scope
                async with pool.acquire() as con:
                    # anyio does not cancel a task whose awaited future is
                    # done: granted, it resumes, and the next checkpoint is
                    # where the cancel lands. The release still runs.
                    handles["acquired"] = True
                    await anyio.lowlevel.checkpoint()
            assert scope.cancelled_caught
            return "cancelled"
    except (asyncio.CancelledError, TimeoutError):
        return "cancelled"
    await pool.release(con)
    return "acquired"


async def _cancel(task: asyncio.Task[Any], inner: asyncio.Task[Any], style: str, handles: dict[str, Any]) -> None:
    """Cancel the queued caller in ``style`` and return once the cancel has
    reached the task that runs acquire() (``inner``)."""
    if style == "cancel_once":
        task.cancel()
    elif style == "cancel_twice":
        task.cancel()
        task.cancel()
    elif style == "timeout":
        handles["cm"].reschedule(asyncio.get_running_loop().time())
        await until(lambda: inner.cancelling() > 0 or inner.done())
    elif style == "wait_for":
        await until(lambda: inner.cancelling() > 0 or inner.done())  # wait_for's own timeout
    else:
        handles["scope"].cancel()


async def _check_books(pool: Any, admin: Any, app_name: str, pid: int) -> None:
    """Nothing counted twice or lost: the one connection is idle, the same
    backend, and a later acquire works."""
    pool._state.check_invariants()
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.in_use, stats.waiting, stats.connecting) == (1, 1, 0, 0, 0), stats
    assert await _backends(admin, app_name) == 1
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT 1") == 1
        assert con.get_server_pid() == pid
    pool._state.check_invariants()


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("point", ["waiting", "granted"])
@pytest.mark.parametrize("style", STYLES)
def test_cancel_a_queued_acquire(pg_dsn: str, app_name: str, loop: str, point: str, style: str) -> None:
    """A task queued behind a busy connection, with another queued behind
    it, is cancelled while it waits, or after the grant but before it
    resumes, in each way a caller can be cancelled. The caller sees the
    cancel (or TimeoutError); the connection goes to the next waiter, never
    counted twice or lost; the server never sees a second backend."""

    async def main() -> None:
        async with _pool_and_admin(pg_dsn, app_name) as (pool, admin):
            holder = await pool.acquire()
            pid = holder.get_server_pid()
            acquired_before = pool.stats().acquired
            handles: dict[str, Any] = {}
            first = asyncio.get_running_loop().create_task(
                _queued_acquire(pool, style, handles, 0.05 if point == "waiting" else 0.3)
            )
            await until(lambda: len(_queued(pool)) == 1)
            [waiter] = _queued(pool)
            inner = _task_waiting_on(waiter.future)

            async def second() -> int:
                async with pool.acquire(timeout=5) as con:
                    return int(con.get_server_pid())

            behind = asyncio.get_running_loop().create_task(second())
            await until(lambda: len(_queued(pool)) == 2)
            if point == "waiting":
                await _cancel(first, inner, style, handles)
                assert await first == "cancelled"
                assert waiter.state is WaiterState.CANCELLED
                assert pool.stats().waiting == 1 and pool.stats().in_use == 1
                await pool.release(holder)
            else:
                gate = Gate(waiter.future)
                await pool.release(holder)
                await gate.fired.wait()
                assert waiter.state is WaiterState.GRANTED and not inner.done()
                assert pool.stats().in_use == 1  # reserved for the waiter, not yet resumed
                await _cancel(first, inner, style, handles)
                gate.open()
                assert await first == "cancelled"
                assert waiter.state is WaiterState.CANCELLED or handles.get("acquired")
            assert await behind == pid  # the same connection, passed on
            assert await _backends(admin, app_name) == 1
            # the one behind (+ the anyio lease that resumed and was cancelled inside)
            assert pool.stats().acquired - acquired_before == 1 + bool(handles.get("acquired"))
            await _check_books(pool, admin, app_name, pid)

    _run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_cancel_right_after_another_task_releases(pg_dsn: str, app_name: str, loop: str) -> None:
    """Without holding anything back: the holder releases (a lease that ran
    no statement: handed on at once) and cancels the queued task in the same
    step. The queued task is granted but has not resumed; it sees the
    cancel, and the connection goes on to the task behind it."""

    async def main() -> None:
        async with _pool_and_admin(pg_dsn, app_name) as (pool, admin):
            holder = await pool.acquire()
            pid = holder.get_server_pid()
            first = asyncio.get_running_loop().create_task(_acquire(pool))
            await until(lambda: len(_queued(pool)) == 1)
            [waiter] = _queued(pool)
            behind = asyncio.get_running_loop().create_task(_acquire(pool, timeout=5))
            await until(lambda: len(_queued(pool)) == 2)
            await pool.release(holder)
            states = (waiter.state, first.done())
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert states == (WaiterState.GRANTED, False)
            con = await behind
            assert con.get_server_pid() == pid
            await pool.release(con)
            await _check_books(pool, admin, app_name, pid)

    _run(loop, main)


# -- errors from the queue path: same types and messages as at 8da8a3d


@pytest.mark.parametrize("loop", list(LOOPS))
def test_acquire_timeout_while_queued(pg_dsn: str, app_name: str, loop: str) -> None:
    """The injected clock passes the queued task's deadline: PoolTimeoutError
    (an asyncio.TimeoutError, as asyncpg raises), with the busy message."""

    async def main() -> None:
        clock = ManualClock()
        async with _pool_and_admin(pg_dsn, app_name, clock=clock, max_waiters=3) as (pool, admin):
            holder = await pool.acquire()
            clock.advance(1.0)
            task = asyncio.get_running_loop().create_task(_acquire(pool, timeout=2.5))
            await until(lambda: len(_queued(pool)) == 1)
            clock.advance(2.4999)
            await asyncio.sleep(0)
            assert not task.done()
            clock.advance(0.0001)
            with pytest.raises(asyncio.TimeoutError) as info:
                await task
            assert type(info.value) is safepool.PoolTimeoutError
            name = pool.stats().name
            assert str(info.value) == (
                f"pool {name!r}: timed out waiting for a connection after 2.500s: max_size=1, in use=1, "
                "idle=0, connecting=0, waiting=0, max_waiters=3; oldest leases: 3.500s at unknown site "
                "(capture_stack is off)"
            )
            assert pool.stats().acquire_timeouts == 1
            pid = holder.get_server_pid()
            await pool.release(holder)
            await _check_books(pool, admin, app_name, pid)

    _run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_max_waiters_refusal_from_the_queue_path(pg_dsn: str, app_name: str, loop: str) -> None:
    """max_waiters=1 with one task queued: the next acquire is refused at
    once with PoolOverloadedError and the busy message; the queued task and
    the books are untouched."""

    async def main() -> None:
        clock = ManualClock()
        async with _pool_and_admin(pg_dsn, app_name, clock=clock, max_waiters=1) as (pool, admin):
            holder = await pool.acquire()
            clock.advance(0.25)
            queued = asyncio.get_running_loop().create_task(_acquire(pool, timeout=5))
            await until(lambda: len(_queued(pool)) == 1)
            with pytest.raises(safepool.PoolOverloadedError) as info:
                await pool.acquire(timeout=5)
            assert type(info.value) is safepool.PoolOverloadedError and info.value.__cause__ is None
            name = pool.stats().name
            assert str(info.value) == (
                f"pool {name!r}: wait queue is full: max_size=1, in use=1, idle=0, connecting=0, waiting=1, "
                "max_waiters=1; oldest leases: 0.250s at unknown site (capture_stack is off)"
            )
            assert pool.stats().overload_rejections == 1
            pid = holder.get_server_pid()
            await pool.release(holder)
            await pool.release(await queued)
            await _check_books(pool, admin, app_name, pid)

    _run(loop, main)


class FlakyConnect:
    """asyncpg.connect, or a refused connection while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.attempts = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        if self.down:
            raise ConnectionRefusedError("connection refused (s24 review)")
        return await asyncpg.connect(*args, **kwargs)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_breaker_refusal_from_the_queue_path(pg_dsn: str, app_name: str, loop: str) -> None:
    """fail_fast=True, no connection, three failed connects: the next acquire
    is refused at once by the queue with ServerUnavailableError (a
    ConnectionError), its message and ``__cause__`` the last connect error.
    Once the server accepts again the pool serves."""

    async def main() -> None:
        clock = ManualClock()
        connect = FlakyConnect()
        connect.down = True
        async with _pool_and_admin(pg_dsn, app_name, clock=clock, min_size=0, fail_fast=True, connect=connect) as (
            pool,
            admin,
        ):
            seen: list[BaseException] = []
            for _ in range(10):
                task = asyncio.get_running_loop().create_task(_acquire(pool, timeout=30))
                for _ in range(100):
                    await asyncio.sleep(0)
                    if task.done():
                        break
                    if _queued(pool) and pool.stats().connecting == 0:
                        clock.advance(1.0)  # queued through the backoff: its next attempt
                try:
                    await task
                except (ConnectionError, safepool.ServerUnavailableError) as exc:
                    seen.append(exc)
                if isinstance(seen[-1], safepool.ServerUnavailableError):
                    break
            # The failure that opened the circuit failed its waiter with
            # ServerUnavailableError already (the two before: the error itself).
            assert [type(e) for e in seen] == [ConnectionRefusedError] * 2 + [safepool.ServerUnavailableError]
            assert type(seen[-1].__cause__) is ConnectionRefusedError
            # The circuit is open (the clock stands still): the next acquire
            # is refused by the queue at once.
            with pytest.raises(safepool.ServerUnavailableError) as info:
                await _acquire(pool, timeout=30)
            refused = info.value
            assert type(refused) is safepool.ServerUnavailableError
            assert isinstance(refused, ConnectionError)
            assert type(refused.__cause__) is ConnectionRefusedError
            name = pool.stats().name
            assert re.fullmatch(
                rf"pool {re.escape(repr(name))} has no connection and the server refuses new ones \(last error: "
                r".*connection refused \(s24 review\).*\); next attempt in \d+\.\d\ds",
                str(refused),
            ), str(refused)
            assert "s24 review" in str(refused)
            assert pool.stats().unavailable_rejections == 2  # the opening failure's waiter, the queue's refusal
            stats = pool.stats()
            assert (stats.size, stats.in_use, stats.waiting) == (0, 0, 0)
            connect.down = False
            clock.advance(60.0)  # past the backoff
            task = asyncio.get_running_loop().create_task(pool.fetchval("SELECT 1", timeout=30))
            for _ in range(200):
                await asyncio.sleep(0)
                if task.done():
                    break
                if pool.stats().size == 0:
                    # Waiting for the next connect attempt. Not once a
                    # connection is open: the manual clock would run the
                    # lease's reset past its watchdog (a CI run's reset took
                    # enough loop turns for that).
                    clock.advance(1.0)
            else:
                await asyncio.wait_for(asyncio.shield(task), 5)
            assert await task == 1
            pool._state.check_invariants()

    _run(loop, main)


# -- SlotLost: the granted connection dies before the waiter resumes


class GatedConnect:
    """asyncpg.connect; once ``hold`` is set, later connects wait for ``go``."""

    def __init__(self) -> None:
        self.hold = False
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.hold:
            self.started.set()
            await self.go.wait()
        return await asyncpg.connect(*args, **kwargs)


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("how", ["pg_terminate_backend", "terminate"])
@pytest.mark.parametrize("outcome", ["served", "timed_out"])
def test_granted_connection_dies_before_the_waiter_resumes(
    pg_dsn: str, app_name: str, loop: str, how: str, outcome: str
) -> None:
    """The connection granted to a queued task dies (the server ends the
    backend, or the client side closes it) before the task resumes: the task
    queues again with what is left of its timeout (same deadline), then gets
    a new, working connection, or times out at the original deadline."""

    async def main() -> None:
        clock = ManualClock()
        connect = GatedConnect()
        async with _pool_and_admin(pg_dsn, app_name, clock=clock, connect=connect) as (pool, admin):
            holder = await pool.acquire()
            old_pid = holder.get_server_pid()
            task = asyncio.get_running_loop().create_task(_acquire(pool, timeout=10))
            await until(lambda: len(_queued(pool)) == 1)
            [waiter] = _queued(pool)
            deadline = waiter.deadline
            assert deadline is not None
            gate = Gate(waiter.future)
            clock.advance(3.0)
            await pool.release(holder)
            await gate.fired.wait()
            assert waiter.state is WaiterState.GRANTED
            slot = waiter.slot
            assert slot is not None
            connect.hold = True
            if how == "pg_terminate_backend":
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", old_pid)
            else:
                slot.connection.terminate()
            await until(lambda: slot.state.value in ("closing", "closed"))
            gate.open()
            # Queued again, behind its own new connect, with the deadline it had.
            await until(lambda: len(_queued(pool)) == 1 and connect.started.is_set())
            [again] = _queued(pool)
            assert again is not waiter and waiter.state is WaiterState.FAILED
            assert again.deadline == pytest.approx(deadline)
            assert not task.done()
            clock.advance(6.999)
            await asyncio.sleep(0)
            assert not task.done()
            if outcome == "timed_out":
                clock.advance(0.001)
                with pytest.raises(safepool.PoolTimeoutError, match=r"after 7\.000s"):
                    await task
                connect.go.set()
                await until(lambda: pool.stats().idle == 1)
            else:
                connect.go.set()
                con = await task
                assert await con.fetchval("SELECT 1") == 1
                new_pid = con.get_server_pid()
                assert new_pid != old_pid
                await pool.release(con)
            assert pool.stats().size == 1
            assert await _backends(admin, app_name) == 1
            async with pool.acquire(timeout=5) as con:
                assert await con.fetchval("SELECT 1") == 1
            pool._state.check_invariants()
            stats = pool.stats()
            assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 1, 0, 0), stats

    _run(loop, main)


# -- AutoResetProxy builds its fields without super().__init__


def _self_assignments(function: Any) -> list[str]:
    source = inspect.getsource(function)
    return sorted(set(re.findall(r"^\s*self\.(\w+)(?::[^=]*)?\s*=", source, re.MULTILINE)))


def test_auto_reset_proxy_sets_every_field_the_base_proxy_sets() -> None:
    """The inlined copy of PoolConnectionProxy.__init__ must not drift: the
    same fields, and the raw connection's proxy set to a weak reference.
    (A guard on the inlined copy: it fails at 8da8a3d by construction.)"""
    base = _self_assignments(PoolConnectionProxy.__init__)
    auto = _self_assignments(AutoResetProxy.__init__)
    assert base == auto == ["_expired", "_holder", "_lease", "_raw"]
    line = "con._proxy = weakref.proxy(self, holder.proxy_collected)"  # (asyncpg's _set_proxy, inlined in both)
    assert line in inspect.getsource(PoolConnectionProxy.__init__)
    assert line in inspect.getsource(AutoResetProxy.__init__)
    assert AutoResetProxy.__slots__ == ()


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("strings", ["on", "off"])
@pytest.mark.parametrize("queued", [False, True])
def test_auto_reset_proxy(pg_dsn: str, app_name: str, loop: str, strings: str, queued: bool) -> None:
    """reset_mode="auto": a lease running only SELECT 1 is reset when the
    session reads strings the old way (standard_conforming_strings=off) and
    not when on; the released proxy raises InterfaceError; an unreleased
    proxy that is garbage collected is reclaimed. Taken at once, or from the
    queue (the lease claim() opens)."""
    pytest.importorskip("pglast")

    async def main() -> None:
        pool = await safepool.create_pool(
            pg_dsn,
            min_size=1,
            max_size=1,
            reset_mode="auto",
            server_settings={"application_name": app_name, "standard_conforming_strings": strings},
        )
        try:
            async with pool.acquire():
                pass  # the first lease of a connection always resets: spend it

            async def lease() -> Any:
                if not queued:
                    return await pool.acquire()
                holder = await pool.acquire()
                task = asyncio.get_running_loop().create_task(_acquire(pool, timeout=5))
                await until(lambda: len(_queued(pool)) == 1)
                await pool.release(holder)
                return await task

            before = pool.stats()
            con = await lease()
            assert type(con) is AutoResetProxy
            raw = con._raw
            assert raw._proxy is not None and raw._proxy.__repr__() == repr(con)  # the weak proxy to it
            assert await con.fetchval("SELECT 1") == 1
            sent_before = raw._protocol.queries_count
            await pool.release(con)
            sent = raw._protocol.queries_count - sent_before
            after = pool.stats()
            resets = after.resets - before.resets
            skipped = after.resets_skipped - before.resets_skipped
            if strings == "off":
                assert (sent, resets, skipped) == (1, 1 + queued, 0)
            else:
                assert (sent, resets, skipped) == (0, 0, 1 + queued)
            with pytest.raises(asyncpg.InterfaceError):
                await con.fetchval("SELECT 1")
            with pytest.raises(asyncpg.InterfaceError):
                con.get_server_pid()
            assert "[released]" in repr(con)

            # Forgotten: the weak reference lets the GC find the leak (a
            # connection something still refers to is never reclaimed).
            del raw
            leaks = pool.stats().leaks_detected
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                forgotten = await lease()
                assert type(forgotten) is AutoResetProxy
                await forgotten.fetchval("SELECT 1")
                del forgotten
                gc.collect()
                await until(lambda: pool.stats().idle == 1)
            assert pool.stats().leaks_detected == leaks + 1
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 1") == 1
            pool._state.check_invariants()
        finally:
            await asyncio.wait_for(pool.close(), 10)

    _run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_cancellation_storm_keeps_the_books(
    pg_dsn: str, app_name: str, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded: 40 tasks on a pool of 3, each cancelled (once, twice, by
    asyncio.timeout, wait_for, an anyio scope) after a random number of loop
    steps, while holders release at random steps: after every step the
    pool's books are consistent; the server never sees more than max_size
    backends; at the end every connection is idle and usable."""
    import random

    rng = random.Random(24)

    async def main() -> None:
        async with _pool_and_admin(pg_dsn, app_name, min_size=3, max_size=3) as (pool, admin):
            done = 0
            cancelled_in: list[str] = []  # the waiter's state when its task was cancelled
            state = pool._state
            cancel_waiter = type(state).cancel_waiter

            def spy(self: Any, waiter: Waiter, now: float) -> None:
                if self is state:
                    cancelled_in.append(waiter.state.value)
                cancel_waiter(self, waiter, now)

            # (On the class: PoolState has slots, no instance attribute to patch.)
            monkeypatch.setattr(type(state), "cancel_waiter", spy)

            async def client(style: str, hold: int) -> None:
                nonlocal done
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    if style == "timeout":
                        async with asyncio.timeout(rng.choice([0, 0.0005, 0.002])):
                            async with pool.acquire() as con:
                                for _ in range(hold):
                                    await asyncio.sleep(0)
                    elif style == "wait_for":
                        con = await asyncio.wait_for(pool.acquire(), rng.choice([0.0005, 0.002, 1]))
                        for _ in range(hold):
                            await asyncio.sleep(0)
                        await pool.release(con)
                    elif style == "anyio_scope":
                        with anyio.CancelScope(deadline=anyio.current_time() + rng.choice([0, 0.0005, 0.002])):
                            async with pool.acquire() as con:
                                for _ in range(hold):
                                    await anyio.lowlevel.checkpoint()
                    else:
                        async with pool.acquire() as con:
                            for _ in range(hold):
                                await asyncio.sleep(0)
                done += 1

            tasks = []
            for _ in range(40):
                style = rng.choice(STYLES)
                task = asyncio.get_running_loop().create_task(client(style, rng.randrange(0, 6)))
                tasks.append((task, style, rng.randrange(0, 8)))
            for step in range(12):
                for task, style, at in tasks:
                    if at == step and style in ("cancel_once", "cancel_twice"):
                        task.cancel()
                        if style == "cancel_twice":
                            task.cancel()
                await asyncio.sleep(0)
                pool._state.check_invariants()
                assert pool.stats().size <= 3
            await asyncio.gather(*(t for t, _, _ in tasks), return_exceptions=True)
            assert "waiting" in cancelled_in
            assert await _backends(admin, app_name) <= 3
            await until(lambda: pool.stats().idle == 3)
            pool._state.check_invariants()
            stats = pool.stats()
            assert (stats.size, stats.in_use, stats.waiting, stats.resetting) == (3, 0, 0, 0), stats
            assert stats.acquired == stats.released
            assert await _backends(admin, app_name) == 3
            cons = [await pool.acquire(timeout=5) for _ in range(3)]
            assert [await c.fetchval("SELECT 1") for c in cons] == [1, 1, 1]
            for con in cons:
                await pool.release(con)

    _run(loop, main)
