"""Review s61, the pool's timers, second round (helper-184): this session's
two timer fixes and their edge cases.

- The reset watchdog (``Runner.check_resets``/``watch_resets``) is re-armed
  for the oldest reset still running, start + 30 s: a younger reset must be
  aborted at its own start + 30 s whatever became of the older one (it
  finished normally, or began in the same instant), a clock that jumps
  far ahead aborts them all in one advance, and a terminated pool's
  watchdog never fires.
- An idle connection above min_size closes at its
  ``max_inactive_connection_lifetime`` though the loop timer is armed for
  a later item (a lease deadline): checked on every path that idles a
  connection or brings its expiry forward other than a release (a
  take-back, a connect that succeeds with nobody waiting, ``min_size``
  lowered, a lease deadline gone stale).

Each test drives the pool on a ``ManualClock`` against the real server and
pins the exact instant, as tests/integration/test_review_s61_timers.py
does: ``EPS`` before the due time nothing has fired, at it the item has.
The mutation each test kills is named in its docstring (each was applied
by hand and the test seen to fail).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from tests._util import drive_io_timers, guarded_clock_class, step_to, until

pytestmark = pytest.mark.asyncio

GuardedClock = guarded_clock_class()

EPS = 2.0**-10  # (exact in binary: 1000.0 + n - EPS + EPS == 1000.0 + n)


class _LockedReset(asyncpg.Connection):  # type: ignore[misc]
    """The reset query first takes the advisory lock keyed by its backend's
    pid: a test that holds that lock keeps the reset running on the server,
    and lets it finish normally by releasing the lock."""

    PREFIX = "SELECT pg_advisory_lock(pg_backend_pid()); SELECT pg_advisory_unlock(pg_backend_pid()); "

    def get_reset_query(self) -> str:
        return self.PREFIX + super().get_reset_query()

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return self.PREFIX + super()._get_reset_query()  # type: ignore[misc]


async def until_waiting_on_lock(admin: Any, pid: int) -> None:
    """Until backend ``pid`` waits for a lock (its reset blocked)."""
    async with asyncio.timeout(5):
        while await admin.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) != "Lock":
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def locked_leases(
    pg_dsn: str, app_name: str, clock: ManualClock, size: int
) -> AsyncIterator[tuple[Any, Any, list[Any], list[int]]]:
    """A pool of ``size`` connections whose resets wait for an advisory lock
    (``_LockedReset``), on ``clock``, with every connection leased; the reset
    watchdog runs on ``clock`` too (it runs on the loop's time otherwise,
    whatever the pool's clock: ``drive_io_timers``). Yields
    ``(pool, admin, leases, pids)``; after: the backends are terminated, the
    admin connection closed and the pool terminated."""
    pool = await safepool.create_pool(
        pg_dsn, min_size=size, max_size=size, clock=clock, connection_class=_LockedReset,
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)
    admin = await asyncpg.connect(pg_dsn)
    leases = [await pool.acquire() for _ in range(size)]
    pids = [con.get_server_pid() for con in leases]
    try:
        yield pool, admin, leases, pids
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        await admin.close()
        pool.terminate()


async def blocked_release(pool: Any, admin: Any, con: Any) -> asyncio.Future[None]:
    """Release ``con`` (dirty: its release resets, with no limit: watched by
    the reset watchdog) while ``admin`` holds its backend's lock: returned
    once the reset waits for it on the server."""
    pid = con.get_server_pid()
    await admin.execute("SELECT pg_advisory_lock($1)", pid)
    await con.fetchval("SELECT 1")
    release = asyncio.ensure_future(pool.release(con))
    await until_waiting_on_lock(admin, pid)
    return release


async def test_a_younger_reset_is_aborted_at_its_own_time_after_the_older_one_finished(
    pg_dsn: str, app_name: str
) -> None:
    """The watchdog is armed by a reset begun at 0 s; a second reset begins
    at 10 s (the timer is armed: not re-armed for it); the first then
    finishes normally at 15 s (its connection goes back idle). When the
    watchdog fires at 30 s it finds only the younger reset, 20 s old: it
    must re-arm for 40 s, its own start + 30 s, and abort it then (the
    release gets the connection's error); the connection whose reset
    finished is untouched.

    Mutation killed: ``Runner.check_resets`` re-arms with
    ``watch_resets()`` (30 s after it fired, as before this session's fix):
    the younger reset was aborted at 60 s."""
    clock = GuardedClock()
    async with locked_leases(pg_dsn, app_name, clock, 2) as (pool, admin, (first, second), pids):
        start = clock.now()
        release_first = await blocked_release(pool, admin, first)
        step_to(clock, start + 10.0)
        release_second = await blocked_release(pool, admin, second)
        step_to(clock, start + 15.0)
        await admin.execute("SELECT pg_advisory_unlock($1)", pids[0])
        await asyncio.wait_for(release_first, 5)  # finished normally: idle
        assert pool.get_idle_size() == 1
        step_to(clock, start + 30.0)  # the first watchdog: nothing 30 s old
        step_to(clock, start + 40.0 - EPS)
        await asyncio.sleep(0.05)  # (an absence: an abort would have ended the release by now)
        assert not release_second.done()
        clock.advance(EPS)
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release_second, 5)
        assert pool._runner.reset_watchdog is None
        async with pool.acquire(timeout=5) as con:  # the first connection, kept
            assert con.get_server_pid() == pids[0]


async def test_resets_begun_in_the_same_instant_are_aborted_together_at_30_s(pg_dsn: str, app_name: str) -> None:
    """Two resets begin at the same clock reading: one watchdog timer, and
    at start + 30 s exactly both are aborted in the one check (nothing
    before), and nothing is left armed.

    Mutation killed: ``Runner.check_resets`` compares ``>`` (strictly
    older than 30 s): at 30 s neither was aborted, and the watchdog,
    re-armed for that same instant, ran again and again inside
    ``advance()`` (:class:`Spinning`)."""
    clock = GuardedClock()
    async with locked_leases(pg_dsn, app_name, clock, 2) as (pool, admin, leases, _):
        start = clock.now()
        releases = [await blocked_release(pool, admin, con) for con in leases]
        assert [holder.reset_since for holder in pool._runner.slot_holders.values()] == [start, start]
        step_to(clock, start + 30.0 - EPS)
        await asyncio.sleep(0.05)  # (an absence)
        assert not any(release.done() for release in releases)
        clock.advance(EPS)
        for release in releases:
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
        assert pool._runner.reset_watchdog is None


async def test_a_clock_jumping_far_ahead_aborts_every_reset_in_one_advance(pg_dsn: str, app_name: str) -> None:
    """Resets begun at 0 s and 10 s, then the clock jumps 1000 s at once (a
    suspended host, a test's ``advance``): the watchdog fires at 30 s (the
    first aborted), re-arms for 40 s, still inside the jump, and aborts
    the second: both releases end, and nothing stays armed.

    Mutation killed: ``Runner.watch_resets`` arms for ``now() + 30`` when
    given the oldest start (the re-armed timer 30 s after the check, at
    60 s): still inside the jump, but the second reset's abort is logged
    50 s old, not 30 s."""
    clock = GuardedClock()
    aborted_at: list[float] = []
    async with locked_leases(pg_dsn, app_name, clock, 2) as (pool, admin, (first, second), _):
        original = pool._runner.check_resets

        def check_resets() -> None:
            before = {slot for slot, holder in pool._runner.slot_holders.items() if holder.reset_since is not None}
            original()
            after = {slot for slot, holder in pool._runner.slot_holders.items() if holder.reset_since is not None}
            aborted_at.extend(clock.now() for _ in before - after)

        pool._runner.check_resets = check_resets
        start = clock.now()
        release_first = await blocked_release(pool, admin, first)
        step_to(clock, start + 10.0)
        release_second = await blocked_release(pool, admin, second)
        clock.advance(1000.0)
        assert aborted_at == [start + 30.0, start + 40.0]
        for release in (release_first, release_second):
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
        assert pool._runner.reset_watchdog is None


async def test_a_terminated_pools_reset_watchdog_never_fires(pg_dsn: str, app_name: str) -> None:
    """``terminate()`` while the watchdog is armed for a running reset: the
    timer is cancelled with the pool's others, and advancing the clock past
    it runs nothing (no abort of a connection the pool gave up, no re-arm).

    Mutation killed: ``Runner.cancel_timers`` leaves the reset watchdog
    armed: it fired after the terminate (and found the terminated slot's
    holder still watched)."""
    clock = GuardedClock()
    fired: list[float] = []
    async with locked_leases(pg_dsn, app_name, clock, 1) as (pool, admin, (con,), _):
        original = pool._runner.check_resets

        def check_resets() -> None:
            fired.append(clock.now())
            original()

        pool._runner.check_resets = check_resets
        release = await blocked_release(pool, admin, con)
        assert pool._runner.reset_watchdog is not None
        pool.terminate()
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release, 5)
        clock.advance(1000.0)
        assert fired == [] and pool._runner.reset_watchdog is None


async def test_a_reset_begun_at_a_reading_whose_difference_rounds_down_is_aborted_at_30_s(
    pg_dsn: str, app_name: str
) -> None:
    """A reset begun at clock reading 1000.1: the watchdog is armed for
    ``1000.1 + 30``, and when it fires ``now - started`` reads
    29.99999999999989 (the sum rounded up, the difference does not undo
    it). The reset must be aborted then: it is 30 s old by the clock the
    timer was armed on. The core compares its own timers as sums
    (``PoolState._lost_adopted``'s docstring names this very trap); the
    watchdog compares a difference, so it finds nothing due and re-arms
    for the same instant: ``ManualClock.advance()`` loops for ever (here
    :class:`Spinning`), on uvloop (a millisecond clock: every start is a
    multiple of 0.001) the loop spins until the next tick, and on asyncio
    (whose timers run up to the clock's resolution early) the same spin.

    Found by this review (fixed: the watchdog compares ``now >= started +
    30``, the sum it armed). Before this session's first fix it re-armed
    for ``now + 30``: the reset was then aborted 30 s late, at 60 s."""
    start = 1000.1
    assert (start + 30.0) - start < 30.0  # (the float trap this test needs)
    clock = GuardedClock(start=start)
    async with locked_leases(pg_dsn, app_name, clock, 1) as (pool, admin, (con,), _):
        release = await blocked_release(pool, admin, con)
        try:
            clock.advance(30.0)  # (exactly the watchdog's instant: start + 30.0)
        finally:
            release.add_done_callback(lambda done: done.cancelled() or done.exception())
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release, 5)


# ------------------------------------------------------- idle expiry paths


async def test_a_taken_back_connection_idles_and_closes_at_its_lifetime_before_a_later_deadline(
    pools: Any,
) -> None:
    """A lease past ``lease_timeout`` (5 s) is taken back (its query
    cancelled, its session reset) and its connection goes back idle at 5 s
    through the take-back's reset, not a release; another lease's deadline
    (1000 s) has the loop timer armed. The idled connection is above
    min_size: it must close at 5 + 10 s, its
    ``max_inactive_connection_lifetime``.

    Mutation killed: ``Runner.after_hand_on`` arms only with no timer
    armed (``timer_at is None``, as before this session's fix): the
    taken-back connection lived on until 1000 s."""
    clock = ManualClock()
    pool = await pools(min_size=0, max_size=2, clock=clock, max_inactive_connection_lifetime=10.0)
    start = clock.now()
    held = await pool.acquire(lease_timeout=1000.0)
    expiring = await pool.acquire(lease_timeout=5.0)
    step_to(clock, start + 5.0)
    assert pool.stats().leases_expired == 1
    await until(lambda: pool.get_idle_size() == 1)  # the take-back's reset ended: idle from 5 s
    assert pool._runner.timer_at == start + 15.0
    step_to(clock, start + 15.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    assert pool.get_idle_size() == 0
    await until(lambda: pool.get_size() == 1)
    await pool.release(expiring)  # (a late release of a taken-back lease: harmless)
    await pool.release(held)


async def test_a_connect_that_ends_with_nobody_waiting_idles_and_closes_at_its_lifetime(pools: Any) -> None:
    """A task's acquire opens a second connection and is cancelled while
    the connect runs (held in its ``init=`` hook): the connect succeeds
    with nobody waiting, and its connection goes idle (at 0 s; nothing
    released) while the loop timer is armed for a lease's deadline
    (1000 s). Above min_size, it must close at 10 s
    (``max_inactive_connection_lifetime``): the connect's drain re-arms.

    Mutation killed: ``Runner.arm_timer`` keeps an armed timer whatever
    the new deadline (``if self.timer_at is not None: return``): the
    connection lived on until 1000 s."""
    clock = ManualClock()
    in_init, gate = asyncio.Event(), asyncio.Event()

    async def init(con: Any) -> None:
        if not gate.is_set():
            in_init.set()
            await gate.wait()

    gate.set()  # (the first connection's init= passes)
    pool = await pools(min_size=0, max_size=2, clock=clock, max_inactive_connection_lifetime=10.0, init=init)
    start = clock.now()
    held = await pool.acquire(lease_timeout=1000.0)
    in_init.clear()
    gate.clear()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.wait_for(in_init.wait(), 5)  # the second connect is in its init= hook
    waiting.cancel()
    await asyncio.sleep(0)
    assert pool.stats().waiting == 0 and pool.stats().connecting == 1
    gate.set()
    await until(lambda: pool.get_idle_size() == 1)  # the connect ended, nobody waiting
    assert pool.stats().waiting == 0
    step_to(clock, start + 10.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    assert pool.get_idle_size() == 0
    await until(lambda: pool.get_size() == 1)
    await pool.release(held)


async def test_an_idle_connection_closes_at_its_lifetime_once_min_size_is_lowered(pools: Any) -> None:
    """min_size=2: the pool opens two connections at 0 s; one is leased
    (its deadline, 1000 s, arms the loop timer), the other idles as part of
    the floor, with no lifetime to watch. At 4 s ``resize(min_size=0)``
    puts it above the floor: it has been idle 4 s and must close at 10 s,
    its lifetime from when it went idle (not 10 s after the resize, nor at
    the lease's deadline).

    Mutation killed: ``Pool.resize`` no longer drains after the core's
    resize (the timer is not re-armed): the connection lived on until
    1000 s."""
    clock = ManualClock()
    pool = await pools(min_size=2, max_size=2, clock=clock, max_inactive_connection_lifetime=10.0)
    start = clock.now()
    held = await pool.acquire(lease_timeout=1000.0)
    assert pool.get_idle_size() == 1
    step_to(clock, start + 4.0)
    pool.resize(min_size=0)
    step_to(clock, start + 10.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    assert pool.get_idle_size() == 0
    await until(lambda: pool.get_size() == 1)
    await pool.release(held)


async def test_an_idle_connection_behind_a_stale_lease_deadline_closes_at_its_lifetime(pools: Any) -> None:
    """A lease with ``lease_timeout=5`` armed the loop timer for 5 s and is
    released early (at 1 s, clean: idle from then). Its deadline went stale
    but the timer stays armed (it comes before the idle expiry, 11 s):
    when it fires with nothing due, it must re-arm for the expiry, and the
    connection closes at 11 s exactly.

    Mutation killed: ``Runner.on_timer`` no longer clears ``timer_at``
    before it drains: the timer was never re-armed, and the connection
    never closed."""
    clock = ManualClock()
    pool = await pools(min_size=0, max_size=1, clock=clock, max_inactive_connection_lifetime=10.0)
    start = clock.now()
    con = await pool.acquire(lease_timeout=5.0)
    clock.advance(1.0)
    await pool.release(con)
    assert pool._runner.timer_at == start + 5.0
    step_to(clock, start + 5.0)
    assert pool.get_idle_size() == 1 and pool._runner.timer_at == start + 11.0
    step_to(clock, start + 11.0 - EPS)
    assert pool.get_idle_size() == 1
    clock.advance(EPS)
    assert pool.get_idle_size() == 0
