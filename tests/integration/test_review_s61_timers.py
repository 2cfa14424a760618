"""Review s61, the pool's timers (helper-183): a timer shared by several
items (the core's timer heap and lease queues behind the runner's one loop
timer) must fire at the earliest item's due time, and be re-armed for the
next one when it fires or when an earlier item arrives; the per-acquire
``setup=`` timer must keep the acquire's own deadline. The bug class came
from the reset watchdog (re-armed 30 s after it fired, not 30 s after the
oldest reset still running: tests/integration/test_review_s61_runtime_mutants.py).

Each test drives the pool on a ``ManualClock`` against the real server and
pins the exact instant: ``EPS`` (a power of two, so the clock's sums are
exact) before the due time nothing has fired, at it the item has. The
mutation each test kills is named in its docstring (each was applied by
hand and the test seen to fail).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from safepool.events import LeakSuspected
from tests._util import drive_io_timers, step_to, until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio

EPS = 2.0**-10  # (exact in binary: 1000.0 + n - EPS + EPS == 1000.0 + n)


async def test_a_shorter_lease_timeout_armed_after_a_longer_one_fires_at_its_own_deadline(pools: Any) -> None:
    """Two leases with different ``lease_timeout=`` acquired long first: the
    loop timer is armed for the long one (50 s), and the short one's
    deadline (5 s, due first) goes to the heap behind it. The leaser re-arms
    the loop timer only when a new lease's first due time is earlier than
    the armed one: here it must, or the short lease is taken back 45 s
    late. The long one is then taken back at its own deadline, the timer
    re-armed for it when the short one's fired.

    Mutation killed: ``Leaser.acquire`` re-arms only when no timer is armed
    (``timer_at is None``): the short lease expired at the long one's
    deadline."""
    clock = ManualClock()
    pool = await pools(min_size=2, max_size=2, clock=clock)
    start = clock.now()
    long = await pool.acquire(lease_timeout=50.0)
    clock.advance(1.0)
    short = await pool.acquire(lease_timeout=5.0)
    step_to(clock, start + 6.0 - EPS)
    assert pool.stats().leases_expired == 0
    clock.advance(EPS)  # the short lease's deadline: 1 + 5 s
    assert pool.stats().leases_expired == 1
    assert [info.id for info in pool.leases()] == [long._lease.id]  # the short one went
    await until(lambda: pool.stats().resetting == 0)
    step_to(clock, start + 50.0 - EPS)
    assert pool.stats().leases_expired == 1
    clock.advance(EPS)
    assert pool.stats().leases_expired == 2 and not pool.leases()
    for con in (long, short):
        await pool.release(con)  # (late releases of taken-back leases: harmless)


async def test_a_lease_armed_behind_a_stale_timer_fires_at_its_own_deadline(pools: Any) -> None:
    """The loop timer was armed for a lease (5 s) released since: its heap
    entry is stale, but the timer stays armed. A lease acquired then with a
    later deadline (20 s after its acquire, 1 s in) does not re-arm it (the
    armed timer comes first); when the stale timer fires with nothing due,
    it must re-arm for the new lease: taken back at 21 s exactly, not at the
    stale time, and not never.

    Mutation killed: ``Runner.on_timer`` no longer clears ``timer_at``
    before it drains (``arm_timer`` then finds a timer armed at or before
    the next deadline and returns): the second lease was never taken back."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    start = clock.now()
    first = await pool.acquire(lease_timeout=5.0)
    await pool.release(first)
    clock.advance(1.0)
    second = await pool.acquire(lease_timeout=20.0)
    step_to(clock, start + 5.0)  # the stale timer fires: nothing is due
    assert pool.stats().leases_expired == 0
    step_to(clock, start + 21.0 - EPS)
    assert pool.stats().leases_expired == 0
    clock.advance(EPS)
    assert pool.stats().leases_expired == 1 and not pool.leases()
    await pool.release(second)


async def test_a_leak_warning_due_after_another_leases_expiry_comes_at_its_own_time(pools: Any) -> None:
    """``leak_warning_after`` (5 s) with a per-acquire ``lease_timeout=``: the
    first lease expires at 2 s (its own warning, due at 5 s, goes with it:
    never reported), and the timer, fired for that deadline, is re-armed for
    the second lease's warning (acquired 1 s in: due at 6 s), which comes at
    that instant, once.

    Mutation killed: ``PoolState._close_lease`` no longer drops the warning
    of a lease that expired: its warning fired at 5 s, for a lease no
    longer held (InternalStateError: illegal lease transition expired ->
    suspect, raised from the clock's callback)."""
    clock = ManualClock()
    pool = await pools(min_size=2, max_size=2, clock=clock, leak_warning_after=5.0)
    suspects: list[tuple[float, int]] = []
    pool.add_event_listener(
        lambda e: suspects.append((clock.now(), e.lease.id)) if isinstance(e, LeakSuspected) else None
    )
    start = clock.now()
    first = await pool.acquire(lease_timeout=2.0)
    clock.advance(1.0)
    second = await pool.acquire(lease_timeout=None)
    step_to(clock, start + 2.0)
    assert pool.stats().leases_expired == 1
    await until(lambda: pool.stats().resetting == 0)
    step_to(clock, start + 6.0 - EPS)
    assert suspects == [] and pool.stats().leak_warnings == 0
    clock.advance(EPS)
    assert suspects == [(start + 6.0, second._lease.id)]
    clock.advance(100.0)
    assert pool.stats().leak_warnings == 1
    pool._state.check_invariants()
    for con in (first, second):
        await pool.release(con)


async def test_an_acquire_timeout_enqueued_behind_a_later_lease_deadline_fires_at_its_deadline(pools: Any) -> None:
    """A task waits with ``acquire(timeout=3)`` on a full pool whose one
    lease has a deadline 100 s away (the loop timer armed for it): its
    waiter deadline, pushed to the heap, must re-arm the timer: it times out
    at 3 s exactly, not when the lease expires.

    Mutation killed: ``Leaser.acquire`` drains after ``enqueue`` only when
    there are actions (not for a waiter's deadline): the waiter timed out at
    100 s, with the lease's take-back."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    start = clock.now()
    held = await pool.acquire(lease_timeout=100.0)
    waiting = asyncio.ensure_future(pool.acquire(timeout=3.0))
    await until(lambda: pool.stats().waiting == 1)
    step_to(clock, start + 3.0 - EPS)
    assert pool.stats().waiting == 1  # (the core's count drops inside advance() when it times out)
    clock.advance(EPS)
    assert pool.stats().waiting == 0
    with pytest.raises(safepool.PoolTimeoutError):
        await asyncio.wait_for(waiting, 5)
    assert pool.stats().leases_expired == 0
    await pool.release(held)


async def test_idle_connections_close_at_their_lifetime_after_an_earlier_lease_timer_fires(pools: Any) -> None:
    """``max_inactive_connection_lifetime`` (10 s) with a leak warning due
    first (4 s): the loop timer fires for the warning and must re-arm for
    the oldest idle connection's expiry. Two idle connections, idle from
    0 s and 2 s, close at 10 s and 12 s exactly (min_size=0: both above
    the floor).

    Mutation killed: ``PoolState.next_deadline`` reads the newest idle
    connection (``_idle[-1]``), not the oldest: the first closed 2 s late."""
    clock = ManualClock()
    pool = await pools(
        min_size=0, max_size=3, clock=clock, leak_warning_after=4.0, max_inactive_connection_lifetime=10.0,
    )
    start = clock.now()
    held = await pool.acquire()  # its warning arms the loop timer for 4 s
    a, b = await pool.acquire(), await pool.acquire()
    await pool.release(a)  # idle from 0 s
    clock.advance(2.0)
    await pool.release(b)  # idle from 2 s
    step_to(clock, start + 4.0)
    assert pool.stats().leak_warnings == 1
    step_to(clock, start + 10.0 - EPS)
    assert pool.get_idle_size() == 2
    clock.advance(EPS)
    assert pool.get_idle_size() == 1
    step_to(clock, start + 12.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    assert pool.get_idle_size() == 0
    await until(lambda: pool.get_size() == 1)
    await pool.release(held)


async def test_a_connections_lifetime_due_before_the_armed_lease_deadline_rearms_the_timer(pools: Any) -> None:
    """``max_lifetime`` (100 s, less up to 10%): the first connection's
    lifetime fires while it is leased (marked retired: closed at release),
    and the loop timer is re-armed for that lease's deadline (1000 s). A
    connection opened then has a lifetime due long before it: the connect's
    drain must re-arm the timer, and the second connection is retired at
    its ``expires_at`` exactly.

    Mutation killed: ``Runner.arm_timer`` keeps an armed timer whatever the
    new deadline (``if self.timer_at is not None: return``): the second
    connection was retired at the lease's deadline."""
    clock = ManualClock()
    pool = await pools(min_size=0, max_size=2, clock=clock, max_lifetime=100.0)
    start = clock.now()
    first = await pool.acquire(lease_timeout=1000.0)
    first_expiry = first._lease.slot.expires_at
    assert start + 90.0 <= first_expiry <= start + 100.0
    step_to(clock, first_expiry - EPS)
    assert pool.stats().connections_retired == 0
    step_to(clock, first_expiry)
    assert pool.stats().connections_retired == 1
    second = await pool.acquire()  # a new connection: the first is leased
    second_expiry = second._lease.slot.expires_at
    assert second_expiry < start + 1000.0
    step_to(clock, second_expiry - EPS)
    assert pool.stats().connections_retired == 1
    step_to(clock, second_expiry)  # (exact: the clock adds back a difference it computed exactly)
    assert pool.stats().connections_retired == 2
    assert pool.stats().leases_expired == 0
    for con in (first, second):
        await pool.release(con)  # retired: both close
    await until(lambda: pool.get_size() == 0)


async def test_lease_timers_fire_at_their_times_while_the_pool_closes(pools: Any) -> None:
    """``close()`` waits for the leases still held; their timers go on
    meanwhile: the leak warning (3 s) and the deadline (5 s) of a lease
    held across the close fire at their instants, and the take-back lets
    the close finish (docs/leases.md: a lease past ``lease_timeout`` is
    taken back; a closing pool is no exception).

    Mutation killed: ``Runner.on_timer`` returns early once the pool is
    closing (``state.closing``, not ``Phase.CLOSED``): neither fired, and
    the close waited for ever."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock, leak_warning_after=3.0)
    start = clock.now()
    held = await pool.acquire(lease_timeout=5.0)
    closing = asyncio.ensure_future(pool.close())
    await until(lambda: pool.is_closing())
    step_to(clock, start + 3.0 - EPS)
    assert pool.stats().leak_warnings == 0
    clock.advance(EPS)
    assert pool.stats().leak_warnings == 1
    step_to(clock, start + 5.0 - EPS)
    assert pool.stats().leases_expired == 0 and not closing.done()
    clock.advance(EPS)
    assert pool.stats().leases_expired == 1
    await asyncio.wait_for(closing, 5)
    assert pool.get_size() == 0
    await pool.release(held)  # (a late release of a taken-back lease: harmless)


async def test_the_setup_hook_runs_under_the_acquires_deadline_not_a_fresh_timeout(pg_dsn: str, app_name: str) -> None:
    """``acquire(timeout=5)`` waits 2 s for a connection, then its ``setup=``
    hook hangs: the hook's timer (one per acquire, ``run_setup_until``) is
    armed for the acquire's deadline, 5 s after the call, as asyncpg's
    ``wait_for()`` bounds the whole acquire: the caller gets
    ``PoolTimeoutError`` at 5 s exactly, not 5 s after the hook began.

    Mutation killed: ``Leaser.run_setup_until`` arms its timer ``timeout``
    seconds after the hook starts: it fired at 7 s."""
    clock = ManualClock()
    hang = asyncio.Event()
    never = asyncio.Event()

    async def setup(con: Any) -> None:
        if hang.is_set():
            await never.wait()

    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, setup=setup, server_settings={"application_name": app_name},
    )
    try:
        start = clock.now()
        held = await pool.acquire()
        hang.set()
        waiting = asyncio.ensure_future(pool.acquire(timeout=5.0))
        await until(lambda: pool.stats().waiting == 1)
        clock.advance(2.0)
        await pool.release(held)  # granted at 2 s: its setup= hook hangs
        await until(lambda: pool.stats().in_use == 1)
        step_to(clock, start + 5.0 - EPS)
        await asyncio.sleep(0.05)  # (an absence: a fired timer's cancel would have ended the task by now)
        assert not waiting.done()
        clock.advance(EPS)
        with pytest.raises(safepool.PoolTimeoutError, match="setup= hook"):
            await asyncio.wait_for(waiting, 5)
    finally:
        pool.terminate()


async def test_a_paced_connect_is_retried_at_its_backoff_though_later_timers_are_armed(
    pools: Any, refused_role: Any,
) -> None:
    """``wait_on_connect_error=True`` with the server refusing this role
    more connections (53300) while the pool holds one: the waiting task's
    connect is refused, and the next starts at ``backoff_until`` (the
    refusal's backoff, 10-50 ms), though the loop timer was armed for the
    waiter's deadline (50 s) and the lease's (100 s) before: each failure
    must re-arm it for the earlier retry. Two retries, each at its instant
    (``EPS`` before: no connect under way; at it: one).

    Mutation killed: ``PoolState.next_deadline`` leaves out ``backoff_until``:
    no connect started at it (the loop timer stayed armed for the waiter's
    deadline, 50 s away)."""
    eps = 2.0**-14  # (the backoff is milliseconds long)
    clock = ManualClock()
    await refused_role.admit()
    pool = await pools(dsn=refused_role.dsn, min_size=1, max_size=2, clock=clock, wait_on_connect_error=True)
    await refused_role.admin.execute(f"ALTER ROLE {refused_role.name} CONNECTION LIMIT 1")  # the one it has
    held = await pool.acquire(lease_timeout=100.0)
    waiting = asyncio.ensure_future(pool.acquire(timeout=50.0))
    state = pool._state
    for failures in (1, 2):
        await until(lambda f=failures: pool.stats().consecutive_connect_failures == f and pool.stats().connecting == 0)
        retry_at = state.backoff_until
        assert clock.now() < retry_at < clock.now() + 0.1
        step_to(clock, retry_at - eps)
        assert pool.stats().connecting == 0
        step_to(clock, retry_at)  # (exact: the clock adds back a difference it computed exactly)
        assert pool.stats().connecting == 1
    await until(lambda: pool.stats().consecutive_connect_failures == 3)
    assert not waiting.done()
    await pool.release(held)
    await pool.release(await asyncio.wait_for(waiting, 5))  # the released connection serves it


class _SleepingReset(asyncpg.Connection):  # type: ignore[misc]
    """The reset query starts with a minute of server time (as in
    test_review_s61_runtime_mutants.py): a reset past the reset watchdog."""

    def get_reset_query(self) -> str:
        return "SELECT pg_sleep(60); " + super().get_reset_query()

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return "SELECT pg_sleep(60); " + super()._get_reset_query()  # type: ignore[misc]


async def test_the_reset_watchdog_fires_at_its_time_while_the_pool_closes(pg_dsn: str, app_name: str) -> None:
    """A release's reset with no limit (no ``reset_timeout``, release
    timeout or ``command_timeout``) is aborted by the reset watchdog 30 s
    after it began; ``close()`` waits for it, so the watchdog must still
    fire while the pool closes: the release gets the connection's error at
    30 s exactly, and the close then finishes (else a reset the server
    never finishes holds ``close()`` for ever).

    Mutation killed: ``Runner.close_all`` cancels the pool's timers when
    the close begins (``cancel_timers()``, as ``finish_close`` does at its
    end): the reset was never aborted, and the close waited for the
    server's minute. (The watchdog runs on the loop's time: here on the
    test's clock, to pin the instant.)"""
    clock = ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, connection_class=_SleepingReset,
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)
    admin = await asyncpg.connect(pg_dsn)
    con = await pool.acquire()
    pid = con.get_server_pid()
    try:
        start = clock.now()
        await con.fetchval("SELECT 1")  # dirty: the release resets, watched
        releasing = asyncio.ensure_future(pool.release(con))
        await until_in_pg_sleep(pg_dsn, pid)
        closing = asyncio.ensure_future(pool.close())
        await until(lambda: pool.is_closing())
        step_to(clock, start + 30.0 - EPS)
        await asyncio.sleep(0.05)  # (an absence: an abort would have ended the release by now)
        assert not releasing.done() and not closing.done()
        clock.advance(EPS)
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(releasing, 5)
        await asyncio.wait_for(closing, 5)
        assert pool.get_size() == 0
    finally:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        pool.terminate()


@pytest.mark.parametrize("query", [False, True], ids=["clean release", "after a reset"])
async def test_an_idle_connection_closes_at_its_lifetime_though_a_later_lease_deadline_is_armed(
    pools: Any, query: bool
) -> None:
    """A lease with a long ``lease_timeout`` (1000 s) has the loop timer
    armed for its deadline; another connection is released idle (nobody
    waiting; with no reset, the release's hot path, or after one, the
    reset's end) with a ``max_inactive_connection_lifetime`` of 10 s. Its
    expiry is due long before the armed timer, so the release must re-arm
    it: the connection closes at 10 s (docs/metrics.md: "idle connections
    above min_size close after max_inactive_connection_lifetime"), not when
    the lease's deadline comes.

    Found by this review: ``Runner.after_hand_on`` armed the timer for an
    idled connection only when none was armed, so the connection lived on
    until the lease's deadline."""
    clock = ManualClock()
    pool = await pools(min_size=0, max_size=2, clock=clock, max_inactive_connection_lifetime=10.0)
    start = clock.now()
    held = await pool.acquire(lease_timeout=1000.0)
    other = await pool.acquire()
    if query:
        await other.fetchval("SELECT 1")
    await pool.release(other)  # idle from 0 s
    step_to(clock, start + 10.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    try:
        assert pool.get_idle_size() == 0
    finally:
        await pool.release(held)


async def test_idle_connections_above_min_size_close_at_their_lifetime_with_max_lifetime_set(pools: Any) -> None:
    """The common configuration: ``max_lifetime`` (an hour) and asyncpg's
    default ``max_inactive_connection_lifetime`` (300 s). The loop timer is
    armed for the first connection's lifetime (54 to 60 minutes away); a
    burst opens a second connection, and both go idle. The one above
    min_size must close 300 s after it went idle, not at the first
    connection's lifetime (found by this review: it lived on till then)."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=2, clock=clock, max_lifetime=3600.0)
    start = clock.now()
    a, b = await pool.acquire(), await pool.acquire()
    await pool.release(a)
    await pool.release(b)  # both idle from 0 s: one above min_size
    step_to(clock, start + 300.0 - EPS)
    assert pool.get_idle_size() == 2
    clock.advance(EPS)
    assert pool.get_idle_size() == 1
    await until(lambda: pool.get_size() == 1)
