"""Adversarial review of the overload features (docs/backpressure.md) on a
real PostgreSQL: bulkheads with max_waiters, the adaptive queue's sheds,
cancellation at the moment of a refusal. Time is a ManualClock wherever
the pool's deadlines decide the outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock

pytestmark = pytest.mark.asyncio


async def _queued(pool: safepool.Pool, waiting: int) -> None:
    """Let the loop run until ``waiting`` tasks wait (no sleeps: loop passes)."""
    for _ in range(1000):
        if pool.stats().waiting == waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {waiting} waiting, got {pool.stats().waiting}")


async def test_capped_site_takes_at_most_its_share_of_max_waiters(pools: Callable[..., Any]) -> None:
    """docs/backpressure.md: "With max_waiters, a site may also take at most
    its share of the queue (ceil(s * max_waiters) waiting tasks), so a capped
    site cannot fill the queue for everyone else", and tasks the pool opens a
    connection for do not count. A site at its cap gets no connection opened
    for it: its waiters are all queued behind busy connections, so the room
    under max_size is not theirs. Before the fix, site "hog" (cap 2, share of
    the queue 1) queued 3 tasks on the room left for others, and site "other"
    was refused a second task although the pool could still open a
    connection for it."""
    pool = await pools(min_size=2, max_size=4, max_site_share=0.5, max_waiters=2)
    held = [await pool.acquire(site="hog") for _ in range(2)]
    tasks = []
    refused = 0
    for _ in range(3):
        task = asyncio.ensure_future(pool.acquire(site="hog"))
        await asyncio.sleep(0)
        if task.done():
            with pytest.raises(safepool.PoolOverloadedError):
                task.result()
            refused += 1
        else:
            tasks.append(task)
    sites = {s.site: s.waiting for s in pool.stats().sites}
    assert sites.get("hog") == 1 and refused == 2, (sites, refused)
    # The other site: two tasks, each one the pool can open a connection for.
    others = [await pool.acquire(site="other") for _ in range(2)]
    assert pool.stats().overload_rejections == 2
    for con in others + held:
        await pool.release(con)
    for task in tasks:
        await pool.release(await task)
    pool._state.check_invariants()


async def test_shed_of_a_waiter_cancelled_in_the_same_turn_is_not_counted(pools: Callable[..., Any]) -> None:
    """A waiter queued before the adaptive queue stood keeps its own timeout;
    once the queue stands, the next hand-on sheds it (it waited longer than
    queue_target). If its task was cancelled in the same loop turn, before
    the shed, the caller gets CancelledError, not PoolOverloadedError: the
    counters count what callers got (PoolState.undelivered), so stats().shed
    must not count it. Before the fix it did (the shed of a waiter at the
    head, unlike one whose deadline was the target, was not recognised)."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, queue_policy="adaptive", clock=clock)
    con = await pool.acquire()
    task = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await _queued(pool, 1)
    clock.advance(0.5)  # the queue now stands: not empty for over queue_interval
    task.cancel()
    await pool.release(con)  # the hand-on sheds the waiter, whose task is cancelled already
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = pool.stats()
    assert (stats.shed, stats.waiting, stats.idle) == (0, 0, 1), stats
    pool._state.check_invariants()



async def _refusal() -> OSError:
    """A real connect refusal: nothing listens on a port just freed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        await asyncpg.connect(host="127.0.0.1", port=port, user="nobody", timeout=5)
    except OSError as exc:
        return exc
    raise AssertionError("a connect to a closed port succeeded")


async def test_connect_failure_of_a_cancelled_waiter_admitted_to_a_standing_queue(pools: Callable[..., Any]) -> None:
    """A waiter admitted while the adaptive queue stands gets queue_target
    instead of its timeout. A connect failure that fails it (the task the
    connect was opened for: asyncpg raises its connect's error) after its
    task was cancelled in the same loop turn is no shed: stats().shed must
    stay 0. Before the fix, PoolState.undelivered took it for one and
    counted shed -1.

    The ``connect=`` callback cancels the waiter's task and raises a real
    refusal in one step: the two events of one loop iteration, in order.
    The patient task's own connect is held meanwhile, so that the
    replacement connect is the victim's (the oldest waiting task that has
    no connect opened for it)."""
    clock = ManualClock()
    refusal = await _refusal()
    hold = asyncio.Event()
    victim: asyncio.Future[Any] | None = None
    calls = 0

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # the patient task's
            await hold.wait()
        elif calls == 4:  # the replacement of the terminated connection: the victim's
            assert victim is not None
            victim.cancel()
            raise refusal
        return await asyncpg.connect(*args, **kwargs)

    pool = await pools(min_size=2, max_size=3, queue_policy="adaptive", clock=clock, connect=connect)
    con1, con2 = await pool.acquire(), await pool.acquire()
    patient = asyncio.ensure_future(pool.acquire())  # no timeout: never shed
    await _queued(pool, 1)
    assert pool.stats().connecting == 1
    clock.advance(0.5)  # the queue stands
    victim = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await _queued(pool, 2)
    await con1.execute("SELECT pg_terminate_backend($1)", con2.get_server_pid())
    for _ in range(1000):  # the pool notices the loss (asyncpg's connection_lost)
        if pool.stats().closing or pool.stats().connect_errors:
            break
        await asyncio.sleep(0.001)
    await pool.release(con2)  # its connection is gone: closed, and a connect replaces it
    with pytest.raises(asyncio.CancelledError):
        await victim
    for _ in range(100):
        if pool.stats().connect_errors:
            break
        await asyncio.sleep(0)
    stats = pool.stats()
    assert (stats.shed, stats.connect_errors, calls) == (0, 1, 4), (stats, patient)
    assert not patient.done()
    hold.set()
    await pool.release(con1)
    await pool.release(await patient)
    pool._state.check_invariants()


async def test_failed_connect_fails_its_own_site_not_a_capped_one(pools: Callable[..., Any]) -> None:
    """docs/backpressure.md: a failed connect fails the task it was opened
    for; the others keep waiting for released connections. Under site caps
    no connect is opened for a capped site's waiter: the connect that
    failed was for the other site's task, which must get the server's error,
    while the capped site's newer waiter keeps waiting. Before the fix the
    newest waiter of any site got it (the capped one), and the task the
    connect was for waited on."""
    refusal = await _refusal()
    failing = False
    gate = asyncio.Event()  # the failing connect answers once both tasks wait

    async def connect(*args: Any, **kwargs: Any) -> Any:
        if failing:
            await gate.wait()
            raise refusal
        return await asyncpg.connect(*args, **kwargs)

    clock = ManualClock()
    pool = await pools(min_size=2, max_size=3, max_site_share=0.5, clock=clock, connect=connect)
    held = [await pool.acquire(site="hog") for _ in range(2)]
    failing = True
    other = asyncio.ensure_future(pool.acquire(site="other"))  # a connect is opened for it
    await _queued(pool, 1)
    hog = asyncio.ensure_future(pool.acquire(site="hog"))  # at its cap: waits for a release
    await _queued(pool, 2)
    gate.set()
    for _ in range(100):
        await asyncio.sleep(0)
        if pool.stats().connect_errors:
            break
    await asyncio.sleep(0)  # the failed task resumes
    assert pool.stats().connect_errors == 1
    assert (other.done(), hog.done(), pool.stats().waiting) == (True, False, 1)
    with pytest.raises(ConnectionRefusedError):
        await other
    failing = False
    await pool.release(held.pop())
    held.append(await hog)
    for con in held:
        await pool.release(con)
    pool._state.check_invariants()


async def test_admission_does_not_count_time_when_nobody_waited(pools: Callable[..., Any]) -> None:
    """Deadline-aware admission: "nothing handed on (while tasks wait) for
    over three such gaps counts as that slow". After a backlog has drained,
    time in which nobody waited says nothing about the drain rate: the first
    task to wait after a quiet second must wait (served at the next
    release), not be refused at once. Before the fix, the time since the
    last hand-on of the old backlog counted as a stall, and an
    acquire(timeout=0.5) arriving a second later was refused with
    PoolOverloadedError while nobody was ahead of it."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, queue_policy="adaptive", clock=clock)
    con = await pool.acquire()
    backlog = [asyncio.ensure_future(pool.acquire()) for _ in range(10)]  # no timeout: never shed
    await _queued(pool, 10)
    for _ in range(10):  # drain them, one connection every 10 ms
        clock.advance(0.01)
        await pool.release(con)
        done, _ = await asyncio.wait(backlog, return_when=asyncio.FIRST_COMPLETED)
        (task,) = done
        backlog.remove(task)
        con = task.result()
    clock.advance(1.0)  # a quiet second: the lease goes on, nobody waits
    late = asyncio.ensure_future(pool.acquire(timeout=0.5))
    await asyncio.sleep(0)
    assert not late.done(), late
    assert pool.stats().admission_rejections == 0
    await pool.release(con)
    await pool.release(await late)
    pool._state.check_invariants()


async def test_resize_under_bulkhead_moves_the_cap_for_queued_waiters(pools: Callable[..., Any], server_count: Any, app_name: str) -> None:
    """resize() with waiters queued under a bulkhead: growing raises the
    site cap (ceil(s * max_size)) and the capped site's waiter is served on a
    new connection at once; shrinking lowers it again, the excess closes as
    leases return, and the server never sees more than max_size backends."""
    pool = await pools(min_size=0, max_size=4, max_site_share=0.5)
    held = [await pool.acquire(site="hog") for _ in range(2)]
    waiter = asyncio.ensure_future(pool.acquire(site="hog"))
    await _queued(pool, 1)
    assert pool.stats().site_cap == 2
    pool.resize(max_size=6)
    assert pool.stats().site_cap == 3
    held.append(await waiter)
    assert await server_count(app_name) == 3
    # Shrink below what the site holds: its next task waits beyond the new cap.
    pool.resize(max_size=2)
    assert pool.stats().site_cap == 1
    late = asyncio.ensure_future(pool.acquire(site="hog"))
    other = asyncio.ensure_future(pool.acquire(site="other"))
    await _queued(pool, 2)
    await pool.release(held.pop())  # 3 -> 2 held, cap 1, size 3 > 2: closed
    await pool.release(held.pop())  # 2 -> 1 held: still at the cap; the other site's task is served
    con = await other
    assert not late.done()
    await pool.release(held.pop())  # the hog's last: now under its cap
    held.append(await late)
    for _ in range(1000):  # the excess connection's close finishes
        if not pool.stats().closing:
            break
        await asyncio.sleep(0.001)
    assert pool.get_size() == 2
    assert await server_count(app_name) <= 2
    for c in [con, *held]:
        await pool.release(c)
    pool._state.check_invariants()


@pytest.mark.parametrize("refusal", ["timeout", "shed"])
async def test_refusal_then_cancel_in_the_same_turn_is_not_counted(pools: Callable[..., Any], refusal: str) -> None:
    """The pool fails a waiter (its acquire timeout, or the adaptive queue's
    target), then, in the same loop turn, before the task resumes, something
    cancels the task (an asyncio.timeout with the same deadline, a cancel
    scope): the caller gets CancelledError, never the pool's error. The
    counters count what callers got, as in the opposite order (cancelled
    first: PoolState.undelivered), so neither acquire_timeouts nor shed
    counts it. Before the fix both did."""
    clock = ManualClock()
    adaptive = refusal == "shed"
    pool = await pools(min_size=1, max_size=1, clock=clock, **({"queue_policy": "adaptive"} if adaptive else {}))
    con = await pool.acquire()
    if adaptive:
        patient = asyncio.ensure_future(pool.acquire())  # keeps the queue standing; never shed
        await _queued(pool, 1)
        clock.advance(0.5)
    task = asyncio.ensure_future(pool.acquire(timeout=1.0))
    await _queued(pool, 2 if adaptive else 1)
    clock.advance(1.0)  # the pool's timer fails the waiter: its future holds the error
    task.cancel()  # same turn: the task has not resumed yet
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = pool.stats()
    assert (stats.acquire_timeouts, stats.shed) == (0, 0), stats
    await pool.release(con)
    if adaptive:
        await pool.release(await patient)
    pool._state.check_invariants()


async def test_breaker_refusal_then_cancel_in_the_same_turn_is_not_counted(pools: Callable[..., Any]) -> None:
    """fail_fast: the connect failure that opens the circuit fails its
    waiter with ServerUnavailableError; a cancellation that reaches the task
    in the same turn (here: a connect_failed event listener, delivered right
    after the failure) wins, and unavailable_rejections must not count it."""
    refusal = await _refusal()
    clock = ManualClock()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise refusal

    pool = await pools(min_size=0, max_size=1, fail_fast=True, clock=clock, connect=connect)
    pending: list[asyncio.Future[Any]] = []

    def listener(event: Any) -> None:
        if isinstance(event, safepool.events.ConnectFailed) and event.consecutive_failures == 3:
            pending[0].cancel()

    pool.add_event_listener(listener)
    for attempt in range(3):
        task = asyncio.ensure_future(pool.acquire(timeout=5.0))
        pending[:] = [task]
        await _queued(pool, 1)
        clock.advance(1.0)  # the backoff has passed: the probe starts
        if attempt < 2:
            with pytest.raises(ConnectionRefusedError):
                await task
        else:
            with pytest.raises(asyncio.CancelledError):
                await task
    stats = pool.stats()
    assert (stats.connect_errors, stats.unavailable_rejections) == (3, 0), stats
    with pytest.raises(safepool.ServerUnavailableError):  # the circuit is open: at once
        await pool.acquire(timeout=5.0)
    assert pool.stats().unavailable_rejections == 1


async def test_standing_queue_sheds_stale_waiters_before_max_waiters_refuses(pools: Callable[..., Any]) -> None:
    """Adaptive queue with max_waiters: once the queue stands, the waiters
    that waited longer than queue_target are shed and the newest is served
    first. A newcomer that finds the queue full of such stale waiters must
    take the place of those (they are shed now, not at the next release),
    not be refused while they stay. Before the fix max_waiters refused the
    newcomer and kept the stale waiters."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, queue_policy="adaptive", max_waiters=2, clock=clock)
    con = await pool.acquire()
    stale = [asyncio.ensure_future(pool.acquire(timeout=5.0)) for _ in range(2)]
    await _queued(pool, 2)
    clock.advance(0.5)  # the queue stands; both waited far longer than queue_target
    newest = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not newest.done(), newest
    for task in stale:
        with pytest.raises(safepool.PoolOverloadedError, match="shed by the adaptive queue"):
            await task
    stats = pool.stats()
    assert (stats.shed, stats.overload_rejections, stats.waiting) == (2, 0, 1), stats
    await pool.release(con)
    await pool.release(await newest)
    pool._state.check_invariants()


async def test_standing_queue_sheds_a_stale_waiter_behind_a_patient_one(pools: Callable[..., Any]) -> None:
    """A waiter without a timeout is never shed, but it must not shield the
    waiters with a timeout queued behind it: at the next hand-on of a
    standing queue, every one that waited longer than queue_target is shed.
    Before the fix shedding stopped at the patient head, and the stale
    waiter behind it waited on (to its own timeout, or a later hand-on)."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, queue_policy="adaptive", clock=clock)
    con = await pool.acquire()
    patient = asyncio.ensure_future(pool.acquire())
    await _queued(pool, 1)
    stale = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await _queued(pool, 2)
    clock.advance(0.5)  # the queue stands
    await pool.release(con)  # the patient one waited a whole interval: served first
    con = await patient
    await asyncio.sleep(0)
    assert stale.done(), pool.stats()
    with pytest.raises(safepool.PoolOverloadedError, match="shed by the adaptive queue"):
        await stale
    assert pool.stats().shed == 1
    await pool.release(con)
    pool._state.check_invariants()


async def test_fifo_within_and_across_sites(pools: Callable[..., Any]) -> None:
    """Bulkheads keep arrival order: within a site FIFO, across sites the
    oldest waiter of a site under its cap first; a capped site's waiters are
    passed over, not starved (served in order once their site releases)."""
    pool = await pools(min_size=2, max_size=2, max_site_share=0.5)  # cap 1
    a = await pool.acquire(site="a")
    b = await pool.acquire(site="b")
    order: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def lease(name: str, site: str) -> None:
        gates[name] = asyncio.Event()
        async with pool.acquire(site=site):
            order.append(name)
            await gates[name].wait()

    async def served(count: int) -> None:
        for _ in range(1000):
            if len(order) == count:
                return
            await asyncio.sleep(0)
        raise AssertionError(order)

    # Arrival order; sites a and b are at their cap, c is under it.
    names = [("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b"), ("c1", "c"), ("a3", "a")]
    tasks = []
    for count, (name, site) in enumerate(names, 1):
        tasks.append(asyncio.create_task(lease(name, site)))
        await _queued(pool, count)
    await pool.release(b)  # eligible now: b1, b2, c1; b1 came first
    await served(1)
    gates["b1"].set()  # b's connection again: eligible b2, c1; b2 came first
    await served(2)
    gates["b2"].set()  # eligible c1 only (a at its cap): the a waiters, older, are passed over
    await served(3)
    await pool.release(a)  # a under its cap: a1, the oldest waiter
    await served(4)
    assert order == ["b1", "b2", "c1", "a1"], order
    for name in ("c1", "a1"):
        gates[name].set()
    await served(5)  # a2 (c1's connection idles: a is at its cap again)
    assert pool.stats().idle == 1
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks)
    assert order == ["b1", "b2", "c1", "a1", "a2", "a3"], order
    pool._state.check_invariants()


async def test_a_site_named_other_does_not_duplicate_the_other_row(pools: Callable[..., Any]) -> None:
    """stats().sites lists the 10 busiest sites, then "other" summing the
    rest; the exporters label rows by site. A site itself named "other" must
    not make two rows labelled "other" (a duplicate series in Prometheus): it
    is summed into the "other" row. Before the fix it was listed twice."""
    pool = await pools(min_size=2, max_size=2, max_site_share=0.5)  # cap 1
    held = [await pool.acquire(site="other"), await pool.acquire(site="x")]
    names = ["other"] * 3 + [f"s{i}" for i in range(10)]  # 12 sites in all
    waiting = []
    for count, name in enumerate(names, 1):
        waiting.append(asyncio.ensure_future(pool.acquire(site=name)))
        await _queued(pool, count)
    rows = pool.stats().sites
    labels = [row.site for row in rows]
    assert len(labels) == len(set(labels)) == 11, labels
    assert sum(row.in_use for row in rows) == 2 and sum(row.waiting for row in rows) == 13, rows
    for con in held:
        await pool.release(con)
    for task in waiting:
        await pool.release(await task)
    pool._state.check_invariants()


async def test_create_pool_keeps_to_max_connecting(pg_dsn: str, app_name: str) -> None:
    """max_connecting bounds the connects in flight at once, pool creation's
    too: init_size connections are opened at most max_connecting at a time
    (a fleet of services starting together must not storm the server with
    logins). Before the fix create_pool() opened all but the first at once."""
    in_flight = 0
    most = 0

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await asyncpg.connect(*args, **kwargs)
        finally:
            in_flight -= 1

    pool = await safepool.create_pool(
        pg_dsn, min_size=6, max_size=6, max_connecting=2, connect=connect,
        server_settings={"application_name": app_name},
    )
    try:
        assert pool.get_size() == 6
        assert most <= 2, most
    finally:
        await pool.close()


@pytest.mark.parametrize("first", ["release", "deadline"])
async def test_deadline_and_release_in_the_same_turn_under_policies(pools: Callable[..., Any], first: str) -> None:
    """A waiter's acquire timeout falls due in the loop turn a release hands
    it the connection (bulkhead and adaptive queue on). Whichever comes
    first wins, and only it: granted first, the task gets the connection
    (no timeout counted); timed out first, it gets PoolTimeoutError and the
    connection idles; the books balance either way."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, max_site_share=1.0, queue_policy="adaptive", clock=clock)
    con = await pool.acquire(site="a")
    task = asyncio.ensure_future(pool.acquire(timeout=0.05, site="b"))
    await _queued(pool, 1)
    if first == "release":
        await pool.release(con)
        clock.advance(0.05)
        con = await task
        assert pool.stats().acquire_timeouts == 0
        await pool.release(con)
    else:
        clock.advance(0.05)
        await pool.release(con)
        with pytest.raises(safepool.PoolTimeoutError):
            await task
        assert pool.stats().acquire_timeouts == 1
    stats = pool.stats()
    assert (stats.idle, stats.waiting, stats.in_use, stats.shed) == (1, 0, 0, 0), stats
    pool._state.check_invariants()


async def test_health_says_the_adaptive_queue_shed_the_probe(pools: Callable[..., Any]) -> None:
    """pool.health(): a probe the adaptive queue shed is reported as such,
    not as "the wait queue is full" (there is no max_waiters here). Before
    the fix every PoolOverloadedError read "the wait queue is full"."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, queue_policy="adaptive", clock=clock)
    con = await pool.acquire()
    patient = asyncio.ensure_future(pool.acquire())
    await _queued(pool, 1)
    clock.advance(0.5)  # the queue stands: the probe gets queue_target, not its timeout
    report_task = asyncio.ensure_future(pool.health(probe_timeout=1.0))
    await _queued(pool, 2)
    clock.advance(0.02)  # past queue_target: shed
    report = await report_task
    (reason,) = [r for r in report.reasons if r.code == "probe_no_connection"]
    assert "adaptive queue" in reason.message and "wait queue is full" not in reason.message, reason
    await pool.release(con)
    await pool.release(await patient)
