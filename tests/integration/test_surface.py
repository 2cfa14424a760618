"""The pool's public observation surface (docs/api.md, "Observing a pool"):
typed events delivered after the books settle, the dict-listener shim,
capture_stack, options, closed, release_lease, timing sinks, LeaseInfo's
task reference, on_pool_created and the thread-safe snapshot. On a real
PostgreSQL."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
import threading
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock, events
from safepool.pool import on_pool_created
from safepool.stats import PoolOptions
from tests._util import asyncpg_version, stuck_in_a_query, until

pytestmark = pytest.mark.asyncio


async def test_typed_events_carry_the_lease_and_match_the_dict_shim(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(name="typed", clock=clock, lease_timeout=30.0, leak_warning_after=10.0)
    typed: list[events.PoolEvent] = []
    dicts: list[dict[str, Any]] = []
    pool.add_event_listener(typed.append)
    pool.add_listener(dicts.append)
    con = await pool.acquire()  # ACQUIRE-LINE
    clock.advance(11.0)
    clock.advance(20.0)
    suspect, expired = typed
    assert isinstance(suspect, events.LeakSuspected) and not suspect.collected
    assert isinstance(expired, events.LeaseExpired) and expired.lease_timeout == pytest.approx(30.0)
    assert suspect.pool == "typed" and suspect.lease.id == expired.lease.id == con._lease.id
    assert suspect.held_seconds == pytest.approx(10.0) and expired.lease.age == pytest.approx(30.0)
    assert "con = await pool.acquire()  # ACQUIRE-LINE" in (expired.lease.stack or "")  # the full stack
    assert expired.lease.task is asyncio.current_task()
    assert dicts == [suspect.to_dict(), expired.to_dict()]
    # (collected: whether a collected proxy sent it, 54144fb)
    assert set(dicts[0]) == {"event", "pool", "lease_id", "held_seconds", "acquired_at", "task_name", "site", "collected"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        suspect.pool = "other"  # type: ignore[misc]
    await until_idle(pool)


async def until_idle(pool: safepool.Pool) -> None:
    async with asyncio.timeout(5):
        while pool.stats().idle != pool.get_size():
            await asyncio.sleep(0.005)


async def test_events_are_delivered_after_the_books_settle(pools: Any) -> None:
    """A listener may call into the pool: terminate() from inside a
    LeaseExpired callback finds consistent books (the take-back done, no
    action loop under way), and events it causes follow in order."""
    clock = ManualClock()
    pool = await pools(name="settled", clock=clock, lease_timeout=1.0, capture_stack=True)
    seen: list[tuple[str, int, int]] = []

    def listener(event: events.PoolEvent) -> None:
        stats = pool.stats()
        seen.append((event.kind, stats.leases_expired, stats.in_use))
        if isinstance(event, events.LeaseExpired):
            pool._state.check_invariants()
            pool.terminate()

    pool.add_event_listener(listener)
    kept = await pool.acquire()  # expires, then stays leased: ended by the terminate
    await pool.acquire()
    clock.advance(2.0)
    assert seen[0] == ("lease_expired", 2, 0)  # both taken back before any callback ran
    # (The terminate's pool_closed follows the event being delivered, and the one queued before it.)
    assert [kind for kind, _, _ in seen] == ["lease_expired", "lease_expired", "pool_closed"]
    assert pool.closed and pool.is_closing()
    await pool.release(kept)  # late: a no-op, reported
    assert seen[-1][0] == "late_release"


async def test_dict_listeners_do_not_get_new_kinds_and_can_be_removed(pools: Any) -> None:
    pool = await pools(name="shim", min_size=1, max_size=1, capture_stack=True)
    dicts: list[dict[str, Any]] = []
    typed: list[events.PoolEvent] = []
    pool.add_listener(dicts.append)
    pool.add_event_listener(typed.append)
    holder_ready = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire():
            holder_ready.set()
            await done.wait()

    task = asyncio.create_task(holder(), name="the-holder")
    await holder_ready.wait()
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.01)
    [timed_out] = typed
    assert isinstance(timed_out, events.AcquireTimedOut) and timed_out.to_dict() is None
    assert (timed_out.max_size, timed_out.in_use, timed_out.idle, timed_out.waiting) == (1, 1, 0, 0)
    assert timed_out.waited >= 0.01
    [held] = timed_out.leases
    assert held.task is task and held.task_name == "the-holder"
    assert dicts == []  # not a kind dict listeners ever had
    done.set()
    await task
    pool.remove_listener(dicts.append)
    pool.remove_event_listener(typed.append)
    with pytest.raises(ValueError):
        pool.remove_listener(dicts.append)
    with pytest.raises(ValueError):
        pool.remove_event_listener(typed.append)


async def test_a_listener_that_is_not_callable_is_refused_when_added(pools: Any) -> None:
    """It was taken, and every later event logged "event listener failed"
    (TypeError: 'NoneType' object is not callable), far from the mistake."""
    pool = await pools(name="listeners", min_size=0, max_size=1)
    for add in (pool.add_listener, pool.add_event_listener):
        for bad in (None, "print", 5):
            with pytest.raises(TypeError, match=f"callback must be callable, got {type(bad).__name__}"):
                add(bad)  # type: ignore[arg-type]
    # Removing one never added says so, in both forms (the typed form said
    # "list.remove(x): x not in list").
    for remove in (pool.remove_listener, pool.remove_event_listener):
        with pytest.raises(ValueError, match="is not a listener of this pool"):
            remove(print)
    # (Only the pytest plugin's own listener, which counts leaks, is there.)
    assert [listener for listener in pool._reporter.listeners if not _is_the_plugins(listener)] == []


def _is_the_plugins(listener: Any) -> bool:
    bound = getattr(listener, "func", listener)  # (a functools.partial: one per pool)
    return type(getattr(bound, "__self__", None)).__name__ == "_LeakTally"


async def test_capture_stack_options_and_closed(pools: Any, pg_dsn: str) -> None:
    pool = await pools(name="opts", min_size=1, max_size=3, lease_timeout=5.0, max_waiters=7, fail_fast=True)
    assert pool.capture_stack is False
    async with pool.acquire():
        [info] = pool.leases()
        assert info.stack is None and info.task_ref is None and info.task is None
    pool.capture_stack = True
    async with pool.acquire():
        [info] = pool.leases()
        assert "test_surface.py" in (info.acquired_at or "") and info.task is asyncio.current_task()
        [bare] = pool.leases(stacks=False)
        assert bare.stack is None and bare.acquired_at == info.acquired_at
    with pytest.raises(TypeError):
        pool.capture_stack = 1
    options = pool.options
    assert isinstance(options, PoolOptions)
    assert (options.name, options.min_size, options.max_size, options.lease_timeout) == ("opts", 1, 3, 5.0)
    assert (options.max_waiters, options.fail_fast, options.reset_mode, options.acquire_timeout) == (7, True, "full", None)
    pool.resize(max_size=4)
    assert pool.options.max_size == 4
    assert "postgres" not in repr(options).lower() and "password" not in repr(options)
    assert (options.capture_stack, options.max_site_share, options.queue_policy, options.queue_target) == (
        True, None, "fifo", None)  # capture_stack as set above, not as created
    assert not pool.closed
    await pool.close()
    assert pool.closed


async def test_release_lease_goes_through_release(pools: Any) -> None:
    pool = await pools(name="leaked", min_size=1, max_size=1)
    leaked = await pool.acquire()
    await leaked.execute("SET work_mem = '1MB'")  # dirty: the release resets it
    [info] = pool.leases()
    assert await pool.release_lease(info.id) is True
    assert pool.leases() == [] and pool.stats().released == 1 and pool.stats().resets == 1
    with pytest.raises(asyncpg.InterfaceError):
        await leaked.fetchval("SELECT 1")  # released: the proxy no longer works
    assert await pool.release_lease(info.id) is False  # nothing open under that id
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW work_mem") != "1MB"


@pytest.mark.parametrize("lease_id", [True, 1.0, "1", None])
async def test_release_lease_takes_only_an_int(pools: Any, lease_id: Any) -> None:
    """``True`` would release lease 1 (bool is an int): a new user's walk,
    2026-12-04. Anything but an int is a TypeError, and the lease stays."""
    pool = await pools(name="typed-ids", min_size=0, max_size=1)
    con = await pool.acquire()
    with pytest.raises(TypeError, match="lease_id must be an int"):
        await pool.release_lease(lease_id)
    assert await con.fetchval("SELECT 1") == 1  # still leased
    await pool.release(con)


@pytest.mark.parametrize("clock", [5, object(), "monotonic"])
async def test_a_clock_without_now_and_call_at_is_a_type_error(pg_dsn: str, clock: Any) -> None:
    """``clock=5`` raised ``AttributeError: 'int' object has no attribute
    'now'`` from inside the pool (a new user's walk, 2026-12-04)."""
    with pytest.raises(TypeError, match=r"clock must have now\(\) and call_at"):
        await safepool.create_pool(pg_dsn, min_size=0, clock=clock)


@pytest.mark.parametrize("retired_by", ["max_queries", "expire_connections"])
async def test_release_lease_of_a_connection_due_to_close(
    pools: Any, server_count: Any, app_name: str, retired_by: str
) -> None:
    # release_lease() passed release() the connection's weak proxy to the
    # lease's proxy; a release that closes the connection (max_queries
    # reached, an expired generation) keeps a weak reference to the proxy,
    # which a weak proxy cannot take: TypeError, the lease stayed held (until
    # a lease timeout) and the connection's close was never finished.
    pool = await pools(min_size=0, max_size=1, max_queries=1 if retired_by == "max_queries" else 50_000)
    leaked = await pool.acquire()
    assert await leaked.fetchval("SELECT 1") == 1
    if retired_by == "expire_connections":
        await pool.expire_connections()
    [info] = pool.leases()
    assert await pool.release_lease(info.id) is True
    stats = pool.stats()
    assert pool.leases() == [] and (stats.released, stats.in_use, stats.connections_closed) == (1, 0, 1)
    with pytest.raises(asyncpg.InterfaceError):
        await leaked.fetchval("SELECT 1")
    assert await server_count(app_name) == 0
    async with pool.acquire() as con:  # a new connection
        assert await con.fetchval("SELECT 2") == 2
    assert pool.stats().connections_opened == 2


async def test_timing_sinks(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(name="timed", min_size=1, max_size=1, clock=clock)
    seen: dict[str, list[float]] = {"wait": [], "lease": [], "connect": []}
    for kind, values in seen.items():
        pool.add_timing_sink(kind, values.append)
    con = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire())
    async with asyncio.timeout(5):
        while pool.stats().waiting != 1:
            await asyncio.sleep(0.005)
    clock.advance(2.0)
    await pool.release(con)
    await pool.release(await waiter)
    await asyncio.sleep(0)  # sinks run in a loop callback of their own
    assert seen["wait"] == [0.0, 2.0] and seen["lease"] == [2.0, 0.0]
    assert pool.stats().acquire_wait.count == 2  # the pool's own histogram is still fed
    for kind, values in seen.items():
        pool.remove_timing_sink(kind, values.append)
    await pool.fetchval("SELECT 1")
    await asyncio.sleep(0)
    assert len(seen["wait"]) == 2 and pool.stats().acquire_wait.count == 3
    with pytest.raises(ValueError, match="kind must be one of"):
        pool.add_timing_sink("query", print)
    # From another thread: installed on the pool's loop.
    await asyncio.to_thread(pool.add_timing_sink, "wait", seen["wait"].append)
    await asyncio.sleep(0)
    await pool.fetchval("SELECT 1")
    await asyncio.sleep(0)
    assert seen["wait"][-1] == 0.0 and len(seen["wait"]) == 3


async def test_a_timing_sink_sees_settled_books_and_may_call_the_pool(pools: Any, loop_name: str) -> None:
    """A sink runs after the books settle: the lease it times has ended in
    stats() and leases(), and it may call into the pool. (The pool's clock
    is the loop's: uvloop's reads whole milliseconds, once per loop
    iteration, so a lease of one SELECT 1 may time 0.0 there.)"""
    pool = await pools(name="sink-calls", min_size=1, max_size=1)
    seen: list[tuple[float, int, int]] = []

    def sink(seconds: float) -> None:
        stats = pool.stats()
        seen.append((seconds, stats.in_use, len(pool.leases())))

    pool.add_timing_sink("lease", sink)
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
    await asyncio.sleep(0)
    assert len(seen) == 1 and seen[0][1:] == (0, 0)
    assert seen[0][0] >= 0 if loop_name == "uvloop" else seen[0][0] > 0, seen


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError), ("5", TypeError), (True, TypeError)]
)
async def test_threadsafe_calls_check_their_arguments(pools: Any, timeout: Any, error: type[Exception]) -> None:
    """From another thread, timeout=-1 (or NaN) read as a blocked loop
    ("its event loop did not answer within -1s"), and "5" was taken when the
    answer came at once; on the loop's thread both were taken silently."""
    pool = await pools(name="threads-args")
    with pytest.raises(error, match="timeout"):
        pool.stats_threadsafe(timeout)
    with pytest.raises(error, match="timeout"):
        await asyncio.to_thread(pool.stats_threadsafe, timeout)
    with pytest.raises(TypeError, match="function must be callable"):
        await asyncio.to_thread(pool.call_threadsafe, None)  # type: ignore[arg-type]
    assert (await asyncio.to_thread(pool.stats_threadsafe, None)).name == "threads-args"  # None: no limit


async def test_stats_threadsafe_runs_on_the_loop(pools: Any) -> None:
    pool = await pools(name="threads")
    loop_thread = threading.get_ident()
    assert pool.stats_threadsafe().name == "threads"  # on the loop: a direct call
    ran_on = await asyncio.to_thread(pool.call_threadsafe, threading.get_ident)
    assert ran_on == loop_thread
    stats = await asyncio.to_thread(pool.stats_threadsafe)
    assert stats.name == "threads" and stats.idle == 1

    # The loop is blocked (it joins the thread): the snapshot times out.
    outcome: list[BaseException | None] = []

    def blocked() -> None:
        try:
            pool.stats_threadsafe(timeout=0.05)
            outcome.append(None)
        except TimeoutError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    thread.join()  # blocks the loop on purpose
    # safepool's own error, so a PoolError, and still the TimeoutError the docs name.
    assert isinstance(outcome[0], TimeoutError) and isinstance(outcome[0], safepool.PoolTimeoutError)
    assert "'threads': its event loop did not answer within 0.05s" in str(outcome[0])


async def test_on_pool_created(pools: Any) -> None:
    created: list[safepool.Pool] = []
    remove = on_pool_created(created.append)
    try:
        pool = await pools(name="hooked")
    finally:
        remove()
    remove()  # idempotent
    assert created == [pool]
    await pools(name="after")
    assert created == [pool]


async def test_options_name_every_setting_but_objects_and_connection_arguments() -> None:
    # A new user found max_site_share, the queue policy and capture_stack
    # missing from pool.options. Every keyword of Pool's is a field, but for
    # connection arguments, hooks and classes (objects, and maybe secrets).
    import dataclasses
    import inspect

    keywords = set(inspect.signature(safepool.Pool.__init__).parameters) - {"self", "loop"}
    objects = {"backoff", "clock", "connect", "connect_args", "connect_kwargs", "connection_class", "init",
               "record_class", "reset", "setup"}
    assert keywords - objects == {f.name for f in dataclasses.fields(PoolOptions)}


async def test_options_of_an_adaptive_site_capped_pool(pg_dsn: str) -> None:
    async with safepool.create_pool(
        pg_dsn, min_size=0, max_size=2, max_site_share=0.5, queue_policy="adaptive",
        queue_target=0.01, queue_interval=0.2, leak_warning_after=30,
    ) as pool:
        options = pool.options
        assert (options.max_site_share, options.queue_policy, options.queue_target, options.queue_interval) == (
            0.5, "adaptive", 0.01, 0.2)
        assert options.capture_stack is True  # on by default with leak_warning_after


async def test_a_pool_cannot_be_copied_or_pickled_and_says_so(pools: Any, server_count: Any, app_name: str) -> None:
    """copy.copy(pool) raised AttributeError ("property '_queue' of 'Pool'
    object has no setter"), pickle.dumps(pool) an error about a WeakSet, and
    copy.deepcopy(pool) one about a contextvars Context after copying half
    the event loop (asyncpg's pool copies into a pool that breaks at first
    use). Each is a TypeError naming the pool, and the pool is unharmed."""
    pool = await pools(name="original", min_size=1, max_size=2)
    copies = [
        ("copy", lambda: copy.copy(pool)),
        ("deepcopy", lambda: copy.deepcopy(pool)),
        ("deepcopy", lambda: copy.deepcopy({"app": [pool]})),  # the pool inside an app's state
    ]
    copies += [("pickle", lambda protocol=protocol: pickle.dumps(pool, protocol)) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)]
    for what, attempt in copies:
        with pytest.raises(TypeError, match=rf"cannot {what} safepool.Pool 'original': a pool cannot be copied or pickled"):
            attempt()
    assert await pool.fetchval("SELECT 1") == 1
    assert pool.get_size() == 1 and await server_count(app_name) == 1
    assert pool.stats().acquired == 1 and not pool.closed


@pytest.mark.parametrize("library", [asyncpg, safepool], ids=["asyncpg", "safepool"])
async def test_terminate_after_the_event_loop_closed_leaves_the_pool_closed_as_asyncpg(
    pg_dsn: str, library: Any
) -> None:
    """An ``asyncio.run()`` that ended with the pool open, then terminate():
    it raises ``RuntimeError("Event loop is closed")`` on both, and asyncpg's
    pool is closed all the same (it marks itself closed first), so a second
    terminate() and a close() from another loop return. safepool's stayed
    open: close() raised EventLoopMismatchError, its repr said "open"."""
    import gc
    import warnings

    pools: list[Any] = []

    async def serve() -> None:
        pools.append(await library.create_pool(pg_dsn, min_size=1, max_size=2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the connection the loop's end left open
        await asyncio.to_thread(asyncio.run, serve())
        pool = pools.pop()
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            pool.terminate()
        if library is asyncpg and asyncpg_version() < (0, 32):
            # asyncpg 0.29-0.31 mark the pool closed after terminating its
            # holders (0.32 first): the raise left it open, and only a second
            # terminate() closes it.
            assert not pool.is_closing() and not pool._closed
            pool.terminate()
        assert pool.is_closing() and pool._closed
        pool.terminate()
        await asyncio.to_thread(asyncio.run, pool.close())
        if library is safepool:
            assert pool.closed and " closed " in repr(pool)
        del pool
        gc.collect()


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_close_cut_short_names_the_leases_it_terminates(
    pools: Any, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A shutdown deadline around close() (cancelled, or asyncio.timeout
    running out): the pool terminates, as asyncpg's, and the warning says
    whose connections were still out, acquire site and task."""
    pool = await pools(min_size=1, max_size=2, capture_stack=True)
    holder = await stuck_in_a_query(pool, "slow-handler")
    deadline = asyncio.timeout(None)  # (set once close() waits: no race with its start)

    async def shut_down() -> None:
        async with deadline:
            await pool.close()

    with caplog.at_level("WARNING", logger="safepool"):
        closing = asyncio.ensure_future(shut_down())
        await until(pool.is_closing)
        if how == "cancel":
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        else:
            deadline.reschedule(asyncio.get_running_loop().time())
            with pytest.raises(TimeoutError):
                await closing
    assert pool.closed and pool.leases() == []
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await holder
    records = [r for r in caplog.records if getattr(r, "event", None) == "close_cut_short"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "close() was cut short (cancelled) with 1 connection(s) not released: terminating them" in message
    assert "tests/_util.py" in message and "in stuck_request" in message and "task slow-handler" in message
    assert records[0].leases == 1 and records[0].pool == pool.name  # type: ignore[attr-defined]


async def test_a_close_with_nothing_held_logs_nothing_when_cut_short(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await pools(min_size=1, max_size=1)
    with caplog.at_level("WARNING", logger="safepool"):
        closing = asyncio.ensure_future(pool.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert pool.closed
    assert not [r for r in caplog.records if getattr(r, "event", None) == "close_cut_short"]
