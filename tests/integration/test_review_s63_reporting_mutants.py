"""Review s63, hand-made mutation review of safepool/_reporting.py (the
pool's messages, log records and events) and safepool/_holder.py (the
per-connection bookkeeping): behaviour no test caught when it was broken on
purpose (one small edit at a time, the tests that exercise it run against
it). Each test here fails against the mutations named in its docstring and
passes against the code as it is. Timing goes through ``ManualClock``: the
ages and waits in the messages are exact.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from safepool.events import AcquireTimedOut, ConnectFailed, ServerStatusChanged
from tests._util import pool_and_admin, until
from tests.io.fake import FakeServer
from tests.io.rig import make_rig, spin

pytestmark = pytest.mark.asyncio


def _pool_and_admin(pg_dsn: str, app_name: str, **options: Any) -> Any:
    return pool_and_admin(pg_dsn, server_settings={"application_name": app_name}, **options)


async def _take(pool: Any, site: str) -> Any:
    return await pool.acquire(site=site)  # s63: the acquire site


async def _acquire(pool: Any, **options: Any) -> Any:
    return await pool.acquire(**options)


async def test_a_timeout_names_the_three_oldest_leases_oldest_first(pg_dsn: str, app_name: str) -> None:
    """Four leases of 4.5, 3.5, 2.5 and 1.5 seconds, taken by named tasks
    at named sites with stacks captured; an acquire times out after 0.5 s.
    The message names the three oldest, oldest first ("the three oldest
    leases with their acquire sites", docs/runbook.md), each with its
    acquire site, its site name and its task, separated by "; "; the
    ``AcquireTimedOut`` event has the sizes and every lease, oldest first
    (events.py).

    Mutations killed: describe_oldest sorting newest first
    (``key=-acquired_at``), listing ``limit - 1`` leases, joining the
    leases with ", ", dropping the " (site ...)" beside a captured acquire
    site; busy_message listing 1 lease, not 3; the event's leases sorted
    youngest first (``key=i.age``), its ``in_use`` and ``idle`` swapped,
    its ``waiting`` and ``max_waiters`` swapped, its ``waited`` the clock's
    reading, not the wait; lease_info's ``age`` the clock's reading."""
    clock = ManualClock()
    events: list[Any] = []
    async with _pool_and_admin(
        pg_dsn, app_name, clock=clock, min_size=4, max_size=4, capture_stack=True, max_waiters=7
    ) as (pool, _admin):
        pool.add_event_listener(events.append)
        held = []
        for site in "abcd":
            held.append(await asyncio.create_task(_take(pool, site), name=f"taker-{site}"))
            clock.advance(1.0)
        task = asyncio.create_task(_acquire(pool, timeout=0.5))
        await until(lambda: pool.stats().waiting == 1)
        clock.advance(0.5)
        with pytest.raises(safepool.PoolTimeoutError) as info:
            await task
        code = _take.__code__
        where = f"{code.co_filename}:{code.co_firstlineno + 1} in _take"
        oldest = "; ".join(
            f"{age}s at {where} (site {site!r}), task taker-{site}"
            for age, site in (("4.500", "a"), ("3.500", "b"), ("2.500", "c"))
        )
        assert str(info.value) == (
            f"pool {pool.stats().name!r}: timed out waiting for a connection after 0.500s: max_size=4, "
            f"in use=4, idle=0, connecting=0, waiting=0, max_waiters=7; oldest leases: {oldest}"
        )
        [event] = [event for event in events if isinstance(event, AcquireTimedOut)]
        assert (event.waited, event.max_size, event.in_use, event.idle, event.connecting, event.waiting,
                event.max_waiters) == (0.5, 4, 4, 0, 0, 0, 7)
        assert [(lease.age, lease.site, lease.task_name, lease.acquired_at) for lease in event.leases] == [
            (4.5, "a", "taker-a", where), (3.5, "b", "taker-b", where),
            (2.5, "c", "taker-c", where), (1.5, "d", "taker-d", where),
        ]
        for con in held:
            await pool.release(con)


class BlockedConnect:
    """asyncpg.connect that waits for ``go`` before it connects."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.attempts = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        await self.go.wait()
        return await asyncpg.connect(*args, **kwargs)


async def test_a_timeout_behind_a_connect_says_no_connection_is_leased(pg_dsn: str, app_name: str) -> None:
    """max_size=1, its only connect under way (held back), two acquires
    waiting: the one with a timeout gives up after 1 s, its message counting
    the connect, the other waiter, no closing connection (no "closing="
    part at all, docs/runbook.md: it appears when there are some) and "no
    connection is leased" where the leases would be.

    Mutations killed: describe_oldest's "no connection is leased" reworded;
    busy_message's ``connecting=`` counting another state; "closing=0"
    written when no connection closes; the ``AcquireTimedOut`` event's
    ``connecting`` counting the closing connections."""
    clock = ManualClock()
    connect = BlockedConnect()
    events: list[Any] = []
    async with _pool_and_admin(
        pg_dsn, app_name, clock=clock, min_size=0, max_size=1, max_waiters=5, connect=connect
    ) as (pool, _admin):
        pool.add_event_listener(events.append)
        first = asyncio.create_task(_acquire(pool))
        await until(lambda: connect.attempts == 1)
        second = asyncio.create_task(_acquire(pool, timeout=1.0))
        await until(lambda: pool.stats().waiting == 2)
        clock.advance(1.0)
        with pytest.raises(safepool.PoolTimeoutError) as info:
            await second
        assert str(info.value) == (
            f"pool {pool.stats().name!r}: timed out waiting for a connection after 1.000s: max_size=1, "
            "in use=0, idle=0, connecting=1, waiting=1, max_waiters=5; no connection is leased"
        )
        [event] = [event for event in events if isinstance(event, AcquireTimedOut)]
        assert (event.waited, event.in_use, event.idle, event.connecting, event.waiting, event.leases) == (
            1.0, 0, 0, 1, 1, ()
        )
        connect.go.set()
        await pool.release(await first)


async def _hold(pool: Any, clock: ManualClock, count: int) -> list[Any]:
    """``count`` leases, taken a second apart (the clock advanced after each)."""
    held = []
    for _ in range(count):
        held.append(await pool.acquire())
        clock.advance(1.0)
    return held


def _records(caplog: pytest.LogCaptureFixture, event: str) -> list[Any]:
    return [record for record in caplog.records if getattr(record, "event", None) == event]


UNKNOWN = "at unknown site (capture_stack is off)"


async def test_the_slow_close_warning_counts_and_names_the_oldest_leases(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """close() waits on four leases (4, 3, 2 and 1 s old) past the slow-close
    mark (made 0 s here, 60 s in use): one WARNING, event ``slow_close``
    (docs/metrics.md: "the message names the oldest"), with the count of
    leases and the three oldest.

    Mutations killed: warn_slow_close counting 0 connections, naming 1
    lease, its record's ``event`` renamed."""
    from safepool import _runner

    monkeypatch.setattr(_runner, "_SLOW_CLOSE", 0)
    clock = ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=4, max_size=4, clock=clock, capture_stack=False,
        server_settings={"application_name": app_name},
    )
    try:
        held = await _hold(pool, clock, 4)
        with caplog.at_level("WARNING", logger="safepool"):
            closing = asyncio.create_task(pool.close())
            await until(lambda: bool(_records(caplog, "slow_close")))
        [record] = _records(caplog, "slow_close")
        assert record.levelname == "WARNING" and record.pool == pool.name
        assert record.getMessage() == (
            f"pool {pool.name!r}: close() is taking over 60 seconds: 4 connection(s) not released. "
            f"oldest leases: 4.000s {UNKNOWN}; 3.000s {UNKNOWN}; 2.000s {UNKNOWN}"
        )
        for con in held:
            await pool.release(con)
        await closing
    finally:
        pool.terminate()


async def test_a_close_cut_short_names_the_three_oldest_of_its_leases(
    pg_dsn: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """close() cancelled while four leases are out: the warning says
    "cancelled", counts the four and names the three oldest, oldest first
    (docs/metrics.md, ``close_cut_short``: "the message names the three
    oldest leases' acquire sites and tasks"); its ``leases`` field is 4.

    Mutations killed: warn_close_cut_short naming 1 lease, its record's
    ``leases`` field 0."""
    clock = ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=4, max_size=4, clock=clock, capture_stack=False,
        server_settings={"application_name": app_name},
    )
    try:
        held = await _hold(pool, clock, 4)  # (kept: a collected proxy would be reclaimed as a leak)
        with caplog.at_level("WARNING", logger="safepool"):
            closing = asyncio.create_task(pool.close())
            await until(pool.is_closing)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        assert pool.closed
        [record] = _records(caplog, "close_cut_short")
        assert record.getMessage() == (
            f"pool {pool.name!r}: close() was cut short (cancelled) with 4 connection(s) not released: "
            f"terminating them. oldest leases: 4.000s {UNKNOWN}; 3.000s {UNKNOWN}; 2.000s {UNKNOWN}"
        )
        assert record.leases == 4 and record.pool == pool.name
        assert pool.leases() == [] and len(held) == 4
    finally:
        pool.terminate()


async def _take_in_a_task(pool: Any, name: str, site: str) -> tuple[Any, asyncio.Task[Any]]:
    task = asyncio.create_task(_take(pool, site), name=name)
    return await task, task


async def test_a_leak_suspects_record_event_and_listing_describe_its_lease(pg_dsn: str, app_name: str) -> None:
    """A lease (task ``suspect-t``, site ``w``, stacks captured,
    ``lease_timeout`` 10 s) still held 2.5 s after its acquire, past
    ``leak_warning_after=2``: the ``leak_suspect`` record's fields, the typed
    event's lease and the dict listener's fields describe it as
    docs/metrics.md says (``lease_id``, ``held_seconds``, ``acquired_at``,
    ``task_name``, ``site``), made at its due time (held 2 s, 8 s before
    the lease timeout); ``Pool.leases()`` gives ``deadline_in`` as the
    seconds left (7.5), its ``task``, and the formatted stack unless
    ``stacks=False``.

    Mutations killed: event_fields' ``held_seconds`` 0, ``acquired_at``
    None, ``task_name`` None, ``site`` None, ``lease_id`` 0; lease_info's
    ``deadline_in`` the deadline's clock reading, the stack formatted even
    with ``stacks=False``, ``task_ref`` None, ``site`` None, ``task_name``
    None, ``acquired_at`` None; emit() describing the lease at its acquire
    (age 0), not when the event was made."""
    clock = ManualClock()
    typed: list[Any] = []
    dicts: list[dict[str, Any]] = []
    records: list[Any] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    leaks = logging.getLogger("safepool.leaks")
    leaks.addHandler(handler)
    try:
        async with _pool_and_admin(
            pg_dsn, app_name, clock=clock, max_size=1, leak_warning_after=2.0, lease_timeout=10.0
        ) as (pool, _admin):
            pool.add_event_listener(typed.append)
            pool.add_listener(dicts.append)
            con, task = await _take_in_a_task(pool, "suspect-t", "w")
            try:
                clock.advance(2.5)  # (the report is made at its due time: 2 s after the acquire)
                await until(lambda: bool(dicts))
                code = _take.__code__
                where = f"{code.co_filename}:{code.co_firstlineno + 1} in _take"
                [info] = pool.leases()
                assert (info.age, info.deadline_in, info.task_name, info.acquired_at, info.site, info.task) == (
                    2.5, 7.5, "suspect-t", where, "w", task
                )
                assert info.stack is not None and f"line {code.co_firstlineno + 1}, in _take" in info.stack
                [bare] = pool.leases(stacks=False)
                assert (bare.stack, bare.acquired_at, bare.task_name, bare.site) == (None, where, "suspect-t", "w")
                [record] = [r for r in records if getattr(r, "event", None) == "leak_suspect"]
                assert (record.pool, record.lease_id, record.held_seconds, record.acquired_at, record.task_name,
                        record.site) == (pool.name, info.id, 2.0, where, "suspect-t", "w")
                assert dicts == [{
                    "event": "leak_suspect", "pool": pool.name, "lease_id": info.id, "held_seconds": 2.0,
                    "acquired_at": where, "task_name": "suspect-t", "site": "w", "collected": False,
                }]
                [event] = typed
                assert (event.lease.id, event.lease.age, event.lease.deadline_in, event.lease.task) == (
                    info.id, 2.0, 8.0, task
                )
            finally:
                await pool.release(con)
    finally:
        leaks.removeHandler(handler)


async def _queued(pool: Any, count: int) -> None:
    await until(lambda: pool.stats().waiting == count)


async def test_a_shed_message_counts_the_waiters_when_each_was_shed(pg_dsn: str, app_name: str) -> None:
    """The adaptive queue: two tasks queue behind the only lease, the queue
    stands 0.2 s later, and a newcomer sheds both. Each shed message counts
    the tasks that waited when that one was shed, itself included
    (docs/backpressure.md): 2 for the first, 1 for the second; not the
    count after the pass (the newcomer alone).

    Mutation killed: shed_message's ``waiting=`` reading the state after the
    shedding pass instead of the count the core passed."""
    clock = ManualClock()
    async with _pool_and_admin(pg_dsn, app_name, clock=clock, queue_policy="adaptive") as (pool, _admin):
        con = await pool.acquire()
        first = asyncio.create_task(_acquire(pool, timeout=5.0))
        await _queued(pool, 1)
        second = asyncio.create_task(_acquire(pool, timeout=5.0))
        await _queued(pool, 2)
        clock.advance(0.2)
        newcomer = asyncio.create_task(_acquire(pool, timeout=5.0))
        messages = []
        for task in (first, second):
            with pytest.raises(safepool.PoolOverloadedError) as info:
                await task
            messages.append(str(info.value))
        stood = (
            f"pool {pool.stats().name!r}: shed by the adaptive queue after 0.200s: the wait queue has not been "
            "empty for 0.200s (queue_interval=0.1s), so waiters get queue_target=0.01s instead of their timeout: "
            "max_size=1, in use=1, waiting="
        )
        assert messages == [stood + "2", stood + "1"]
        await pool.release(con)
        await pool.release(await newcomer)


async def test_a_refusal_at_once_counts_the_tasks_waiting(pg_dsn: str, app_name: str) -> None:
    """Deadline-aware admission (the adaptive queue) refuses at once an
    acquire that cannot be served within its timeout: after a backlog
    drained at one connection per 10 ms, one task is still waiting and
    ``acquire(timeout=0.015)`` cannot be served in time. The message ends
    with the pool's sizes and the tasks waiting now (the one ahead).

    Mutation killed: shed_message's ``waiting=`` taking only the count
    passed (None here: the refusal passes none)."""
    clock = ManualClock()
    async with _pool_and_admin(
        pg_dsn, app_name, clock=clock, queue_policy="adaptive", queue_interval=1.0
    ) as (pool, _admin):
        con = await pool.acquire()
        backlog = [asyncio.create_task(_acquire(pool)) for _ in range(11)]  # no timeout: never shed
        await _queued(pool, 11)
        for _ in range(10):  # one connection every 10 ms: the drain rate
            clock.advance(0.01)
            await pool.release(con)
            done, _ = await asyncio.wait(backlog, return_when=asyncio.FIRST_COMPLETED)
            (task,) = done
            backlog.remove(task)
            con = task.result()
        refused = asyncio.create_task(_acquire(pool, timeout=0.015))
        await asyncio.wait([refused], timeout=5)
        with pytest.raises(safepool.PoolOverloadedError) as info:
            await refused
        message = str(info.value)
        assert message.startswith(f"pool {pool.stats().name!r}: refused at once: cannot be served within its "
                                  "timeout (0.015s): 1 task(s) ahead"), message
        assert message.endswith(": max_size=1, in use=1, waiting=1"), message
        await pool.release(con)
        await pool.release(await backlog[0])


async def test_the_fail_fast_refusal_says_when_the_next_attempt_comes(pg_dsn: str, app_name: str) -> None:
    """``fail_fast=True``, every connect refused, each delay 2 s (a
    ``Backoff`` whose ceilings are all 4 s, its random half 0), the clock
    starting at 1000: once the circuit opens, an acquire is refused at once
    with ``ServerUnavailableError``, naming the last connect error as the
    one-line description (type and first line of its message, as every
    message: docs/metrics.md) and the seconds until the next attempt (2.00),
    not the clock's reading of it.

    A probe connect past the backoff that outlasts its delay (each delay
    runs from the start of the attempt: ``Backoff``) and fails refuses its
    waiter with the next attempt due at once: "0.00s", never a negative
    count of seconds.

    Mutations killed: unavailable_error's "next attempt in" giving the
    backoff's end on the clock instead of the seconds left, or not clamped
    at 0; the last error shown as its repr (every line of its message)."""
    clock = ManualClock(1000.0)
    gate: asyncio.Event | None = None
    attempts = 0

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if gate is not None:
            await gate.wait()
        raise ConnectionRefusedError("connection refused (s63)\nsecond line")

    backoff = safepool.Backoff(base=4.0, cap=4.0, refused_cap=4.0, unreachable_cap=4.0, rng=lambda: 0.0)
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, clock=clock, fail_fast=True, connect=connect, backoff=backoff,
        server_settings={"application_name": app_name},
    )
    try:
        refused: BaseException | None = None
        for _ in range(10):
            task = asyncio.create_task(_acquire(pool, timeout=30))
            for _ in range(100):
                await asyncio.sleep(0)  # (loop turns while the refused connects run: no timing)
                if task.done():
                    break
                if pool.stats().waiting and pool.stats().connecting == 0:
                    clock.advance(2.0)  # queued through the backoff: its next attempt
            with pytest.raises((ConnectionError, safepool.ServerUnavailableError)) as info:
                await task
            if isinstance(info.value, safepool.ServerUnavailableError):
                break
        with pytest.raises(safepool.ServerUnavailableError) as caught:
            await pool.acquire(timeout=30)
        refused = caught.value
        assert str(refused) == (
            f"pool {pool.name!r} has no connection and the server refuses new ones (last error: "
            "ConnectionRefusedError: connection refused (s63)); next attempt in 2.00s"
        )
        assert type(refused.__cause__) is ConnectionRefusedError
        # Past the backoff, a probe connect outlasts its delay (5 s, the delay
        # 2 s from its start) and fails: its waiter is refused, the next
        # attempt due at once (0.00 s), not 3 s ago.
        gate = asyncio.Event()
        clock.advance(2.0)
        probe = asyncio.create_task(_acquire(pool, timeout=30))
        started = attempts
        await until(lambda: attempts > started)
        clock.advance(5.0)
        gate.set()
        with pytest.raises(safepool.ServerUnavailableError) as caught:
            await probe
        assert str(caught.value).endswith("(last error: ConnectionRefusedError: connection refused (s63)); "
                                          "next attempt in 0.00s"), str(caught.value)
    finally:
        pool.terminate()


async def test_a_leases_stack_masks_the_password_argument(pg_dsn: str, app_name: str) -> None:
    """The pool's ``password=`` connect argument, which no other argument
    shows, is masked in the acquire stacks the pool reports (Reporter.
    format_stack: "its ``password=`` argument's unless another argument
    shows the same value"; docs/metrics.md: records and events never
    contain a password), here on the acquire's source line.

    Mutation killed: format_stack counting the ``password=`` argument
    itself among the arguments that show it (never masked)."""
    secret = "s63-Pass-Word-7741"

    async def connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("password")  # (the test server's login is the DSN's)
        return await asyncpg.connect(*args, **kwargs)

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, capture_stack=True, password=secret, connect=connect,
        server_settings={"application_name": app_name},
    )
    try:
        con = await pool.acquire()  # s63-Pass-Word-7741
        [info] = pool.leases()
        assert info.stack is not None and "con = await pool.acquire()  # ***" in info.stack, info.stack
        assert secret not in info.stack
        await pool.release(con)
    finally:
        pool.terminate()


async def test_failed_connects_warn_first_in_each_run_then_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """The fake server, the manual clock: connects refused at 0, 0.5 and
    1.0 s, one succeeds at 1.2 s, another is refused at 1.4 s. WARNING for
    the first failure in a row and then once a second (docs/metrics.md,
    ``connect_failed``: "WARNING for the first failure in a row and then at
    most once a second"): the one at 1.0 s, a second after the first, is a
    WARNING, and so is the one at 1.4 s, the first of a new run; the one at
    0.5 s is DEBUG. Each record has ``error``; the events count the run.
    The server status goes down at the first failure (WARNING), up at the
    success (INFO), down again (WARNING).

    Mutations killed: the pacing's ``>=`` made ``>``, its interval 2 s; the
    first failure of a run no longer WARNING by itself; the record's
    ``error`` field dropped; the server status logged at WARNING when up."""
    rig = await make_rig(max_size=2)
    caplog.set_level(logging.DEBUG, logger="safepool")
    events: list[Any] = []
    rig.pool.add_event_listener(events.append)

    async def refused_acquire() -> None:
        task = asyncio.ensure_future(rig.pool.acquire())
        await spin()
        rig.server.finish_connect(ConnectionRefusedError("refused"))
        with pytest.raises(ConnectionRefusedError):
            await task

    await refused_acquire()
    for step in (0.5, 0.5):
        rig.clock.advance(step)
        await refused_acquire()
    rig.clock.advance(0.2)
    con = await rig.lease()  # (held: the next acquire connects)
    rig.clock.advance(0.2)
    await refused_acquire()
    failed = [r for r in caplog.records if getattr(r, "event", None) == "connect_failed"]
    name = rig.pool.name
    assert [(r.levelname, r.getMessage(), r.error, r.pool) for r in failed] == [
        (level, f"pool {name!r}: connect failed (ConnectionRefusedError: refused); {n} consecutive failures",
         "ConnectionRefusedError: refused", name)
        for level, n in (("WARNING", 1), ("DEBUG", 2), ("WARNING", 3), ("WARNING", 1))
    ]
    assert [e.consecutive_failures for e in events if isinstance(e, ConnectFailed)] == [1, 2, 3, 1]
    status = [r for r in caplog.records if getattr(r, "event", None) == "server_status"]
    assert [(r.levelname, r.getMessage()) for r in status] == [
        ("WARNING", f"pool {name!r}: server status up -> down"),
        ("INFO", f"pool {name!r}: server status down -> up"),
        ("WARNING", f"pool {name!r}: server status up -> backing_off"),
    ]
    assert [(e.previous, e.status) for e in events if isinstance(e, ServerStatusChanged)] == [
        ("up", "down"), ("down", "up"), ("up", "backing_off"),
    ]
    await rig.pool.release(con)
    rig.pool.terminate()


async def test_create_pools_failed_first_connect_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    """create_pool's first connect fails: create_pool raises the error, and
    the pool logs its ``connect_failed`` and ``server_status`` records at
    DEBUG (docs/metrics.md: "DEBUG ... for ``create_pool``'s first connect,
    whose error ``create_pool`` raises: asyncpg logs nothing then"; the
    server status "DEBUG when ``create_pool`` raises the failure"): nothing
    above DEBUG.

    Mutations killed: connect_failed's pacing ignoring ``raised`` (a
    WARNING); note_server_status not told the failure was raised, or
    ignoring ``quiet`` (a WARNING)."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("refused at start-up (s63)")

    caplog.set_level(logging.DEBUG, logger="safepool")
    with pytest.raises(ConnectionRefusedError):
        await safepool.create_pool(connect=connect, min_size=1, max_size=1, clock=ManualClock())
    records = [r for r in caplog.records if r.name == "safepool"]
    assert [(r.event, r.levelname) for r in records] == [  # type: ignore[attr-defined]
        ("connect_failed", "DEBUG"), ("server_status", "DEBUG"),
    ]


class Stop(SystemExit):
    """A listener's SystemExit, which the delivery lets through (as asyncio's
    callbacks do; any other BaseException, CancelledError included, is
    logged as an Exception is since review h262)."""


async def test_listeners_get_events_in_order_whatever_a_listener_does(pg_dsn: str, app_name: str) -> None:
    """Three late releases (``late_release`` events). The first listener
    removes itself at the first event: the second still gets that event
    (events.py: every listener gets each event). At the second event the
    second listener raises SystemExit, which reaches the releasing
    caller: the third event still reaches the listeners (the delivery is
    not left marked as under way).

    Mutations killed: deliver() iterating the live listener list (a
    listener that removes itself makes the next one miss the event);
    deliver() leaving ``delivering`` set when a listener's SystemExit
    passes through (no event delivered from then on)."""
    seen: list[tuple[str, int]] = []

    async with _pool_and_admin(pg_dsn, app_name) as (pool, _admin):
        def first(event: Any) -> None:
            seen.append(("first", event.lease_id))
            pool.remove_event_listener(first)

        def second(event: Any) -> None:
            seen.append(("second", event.lease_id))
            if len(seen) == 3:  # its second event
                raise Stop

        pool.add_event_listener(first)
        pool.add_event_listener(second)
        con = await pool.acquire()
        lease = con._lease.id
        await pool.release(con)
        await pool.release(con)  # late: the first event
        with pytest.raises(Stop):
            await pool.release(con)
        await pool.release(con)
        assert seen == [("first", lease), ("second", lease), ("second", lease), ("second", lease)]


async def test_a_listeners_own_events_follow_the_event_it_was_given(pg_dsn: str, app_name: str) -> None:
    """A listener that calls into the pool, which emits more events, sees
    those events after the one it was handling has reached every listener
    (Reporter.deliver: "its events follow"): the first listener terminates
    the pool at a ``late_release`` event while another connection is
    leased, and the second listener gets ``late_release`` and then
    ``lease_ended``, in that order.

    Mutation killed: deliver() without its guard against a delivery inside
    a delivery (the nested one hands on the listener's events first)."""
    order: list[str] = []
    async with _pool_and_admin(pg_dsn, app_name, min_size=2, max_size=2) as (pool, _admin):
        def terminating(event: Any) -> None:
            if event.kind == "late_release":
                pool.terminate()

        pool.add_event_listener(terminating)
        pool.add_event_listener(lambda event: order.append(event.kind))
        con = await pool.acquire()
        other = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # late: its listener terminates the pool, ending `other`'s lease
        await until(lambda: "lease_ended" in order)
        assert order == ["late_release", "lease_ended", "pool_closed"]  # (the terminate's, last)
        assert pool.closed and pool.leases() == [] and other is not con


async def test_no_floor_warning_for_the_connect_of_a_task_that_gave_up(caplog: pytest.LogCaptureFixture) -> None:
    """``min_size=0``: an acquire times out while its connect is under way,
    and the connect then fails. The pool logs the failure
    (``connect_failed``), but not asyncpg's "Failed to restore the pool
    connection floor" (docs/metrics.md: a connect "of the ``min_size``
    upkeep"): the pool keeps no floor, the connect was the task's.

    Mutation killed: connect_failed's floor warning without the
    ``min_size`` condition."""
    rig = await make_rig(min_size=0, max_size=1)
    caplog.set_level(logging.DEBUG)
    task = asyncio.ensure_future(rig.pool.acquire(timeout=1.0))
    await spin()
    assert rig.server.connects
    rig.clock.advance(1.0)
    with pytest.raises(safepool.PoolTimeoutError):
        await task
    rig.server.finish_connect(ConnectionRefusedError("refused after the timeout (s63)"))
    await spin()
    assert [r.error for r in caplog.records if getattr(r, "event", None) == "connect_failed"] == [
        "ConnectionRefusedError: refused after the timeout (s63)"
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "asyncpg.pool"] == []
    rig.pool.terminate()


async def test_no_floor_warning_for_a_connect_that_fails_while_the_pool_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``min_size=1`` (a floor): a task's connect outlives its acquire's
    timeout and fails while the pool is closing. Logged as
    ``connect_failed``, but not as asyncpg's floor upkeep ("Failed to
    restore the pool connection floor; retrying"): a closing pool restores
    no floor and retries nothing.

    Mutation killed: connect_failed's floor warning without the
    ``not closing`` condition."""
    server = FakeServer()
    server.auto_connect = True
    rig = await make_rig(server, min_size=1, max_size=2)
    server.auto_connect = False
    caplog.set_level(logging.DEBUG)
    con = await rig.pool.acquire()
    task = asyncio.ensure_future(rig.pool.acquire(timeout=1.0))
    await spin()
    assert server.connects
    rig.clock.advance(1.0)
    with pytest.raises(safepool.PoolTimeoutError):
        await task
    closing = asyncio.ensure_future(rig.pool.close())
    await spin()
    assert rig.pool.is_closing()
    server.finish_connect(ConnectionRefusedError("refused while closing (s63)"))
    await spin()
    assert [r.error for r in caplog.records if getattr(r, "event", None) == "connect_failed"] == [
        "ConnectionRefusedError: refused while closing (s63)"
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "asyncpg.pool"] == []
    await rig.pool.release(con)
    await closing


async def test_a_timeout_under_site_caps_names_the_three_busiest_sites_and_the_rest(
    pg_dsn: str, app_name: str
) -> None:
    """``max_site_share=0.25`` of ``max_size=4`` (a cap of one connection a
    site): sites a, b, c and d hold one each, and a second acquire at site
    a times out at its cap (its own wait no longer counted). The message
    gives the cap and the usage of the three busiest sites (a tie: by
    name), then "other" for the rest (PolicyBooks.usage:
    "the ``top`` busiest sites, busiest first, then ``("other", ...)``
    summing the rest"; busy_message asks for 3).

    Mutation killed: busy_message listing the two busiest sites."""
    clock = ManualClock()
    async with _pool_and_admin(
        pg_dsn, app_name, clock=clock, min_size=4, max_size=4, max_site_share=0.25, max_waiters=8,
        capture_stack=False,
    ) as (pool, _admin):
        held = [await pool.acquire(site=site) for site in "abcd"]
        task = asyncio.create_task(_acquire(pool, site="a", timeout=1.0))
        await _queued(pool, 1)
        clock.advance(1.0)
        with pytest.raises(safepool.PoolTimeoutError) as info:
            await task
        assert str(info.value) == (
            f"pool {pool.name!r}: timed out waiting for a connection after 1.000s: max_size=4, in use=4, idle=0, "
            "connecting=0, waiting=0, max_waiters=8, site cap=1 (a: 1 in use, 0 waiting, b: 1 in use, 0 waiting, "
            "c: 1 in use, 0 waiting, other: 1 in use, 0 waiting); oldest leases: 1.000s at site 'a'; "
            "1.000s at site 'b'; 1.000s at site 'c'"
        )
        for con in held:
            await pool.release(con)


async def test_the_reset_watchdog_leaves_a_connection_that_never_reset_alone(
    pg_dsn: str, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two connections; a release's reset runs with no limit (a minute on
    the server) under the reset watchdog, which aborts it 30 s later. The
    other connection, open since start-up and never reset, has no reset
    running (Holder.reset_since None: "when a release's unbounded reset
    started"): the watchdog reports one reset aborted, and the idle
    connection goes on serving, the same backend.

    Mutation killed: a new holder's ``reset_since`` 0.0 (a reset taken as
    running since the clock's start: the watchdog aborts the idle one too)."""
    from tests._util import drive_io_timers, sleeping_reset_connection_class, until_in_pg_sleep

    clock = ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=2, max_size=2, clock=clock, connection_class=sleeping_reset_connection_class(),
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)  # (the watchdog runs on the loop's time otherwise)
    admin = await asyncpg.connect(pg_dsn)
    pids: list[int] = []
    try:
        first = await pool.acquire()
        pids.append(first.get_server_pid())
        # The other connection, never leased (a first lease's release resets).
        pids.insert(0, await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2", app_name, pids[0]
        ))
        await first.fetchval("SELECT 1")  # dirty: the release resets
        with caplog.at_level("WARNING", logger="safepool"):
            release = asyncio.ensure_future(pool.release(first))
            await until_in_pg_sleep(pg_dsn, pids[1])
            clock.advance(30.0)
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
        aborted = [r.getMessage() for r in _records(caplog, "reset_failed") if "got no answer" in r.getMessage()]
        assert aborted == [f"pool {pool.name!r}: a reset got no answer for 30s; aborting the connection"]
        con = await pool.acquire()  # (not released: its release would reset, a minute on the server)
        assert con.get_server_pid() == pids[0]
        assert await con.fetchval("SELECT 2") == 2
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        await admin.close()
        pool.terminate()


@pytest.mark.safepool_allow_leaks  # (on purpose)
async def test_a_deferred_reclaims_report_dates_the_proxys_collection(pg_dsn: str, app_name: str) -> None:
    """A lease's proxy, acquired at 100 s on the clock, is garbage collected
    2 s later while a termination listener it registered keeps the
    connection in use: the reclaim is deferred. ``release_lease()`` 3 s
    later reclaims it, and the leak report dates the collection from the
    holder's record of it: "2.000s after its acquire (reclaimed 5.000s after
    it ...)" (Holder.orphaned_at: "a deferred reclaim's report dates the
    collection by it").

    Mutation killed: the holder no longer noting when the proxy was
    collected (the report said -100.000s)."""
    import gc

    clock = ManualClock(100.0)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    leaks = logging.getLogger("safepool.leaks")
    leaks.addHandler(handler)
    try:
        async with _pool_and_admin(pg_dsn, app_name, clock=clock) as (pool, _admin):
            con = await pool.acquire()
            con.add_termination_listener(lambda _con: None)
            [info] = pool.leases()
            clock.advance(2.0)
            del con
            with pytest.warns(ResourceWarning):
                gc.collect()
                await until(lambda: any(getattr(r, "event", None) == "leak_suspect" for r in records))
                clock.advance(3.0)
                await pool.release_lease(info.id)
            [leak] = [r for r in records if getattr(r, "event", None) == "leak"]
            assert ("garbage collected without being released, 2.000s after its acquire (reclaimed 5.000s after "
                    "it, once nothing used the connection any more)") in leak.getMessage(), leak.getMessage()
    finally:
        leaks.removeHandler(handler)


async def test_a_kept_released_proxy_lets_go_of_a_closed_connection_a_lease_listener_refers_to(
    pg_dsn: str, app_name: str
) -> None:
    """A lease registers a termination listener that refers to its
    connection (a closure over it), which the release keeps (as asyncpg's);
    the connection is then expired and closed. The program keeps the
    released proxy: the closed connection must be collectable all the same
    (Holder.let_go drops "the callbacks ``init=``, a connection class or a
    lease registered, which may refer to it"), as
    tests/integration/test_review_s58b.py checks for the first two.

    Mutation killed: let_go() keeping ``lease_callbacks``."""
    import functools
    import gc
    import weakref

    async with _pool_and_admin(pg_dsn, app_name) as (pool, _admin):
        async with pool.acquire() as proxy:
            raw = proxy._raw
            proxy.add_termination_listener(functools.partial(lambda connection, _con: None, raw))
            connection, protocol = weakref.ref(raw), weakref.ref(raw._protocol)
            del raw
        await pool.expire_connections()
        async with pool.acquire() as other:  # (the expired connection is closed at this acquire)
            await other.fetchval("SELECT 1")
        del other
        for _ in range(40):
            gc.collect()
            if connection() is None and protocol() is None:
                break
            await asyncio.sleep(0.05)
        assert connection() is None and protocol() is None
        assert proxy is not None
