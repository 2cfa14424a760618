"""Review helper-219: a second read of helper-217's hot-path cuts (the
direct wake of ``Runner.reset_done``, the ``extras`` flag of
``Leaser.acquire``, ``Holder.reset_text`` outside ``reset_mode="full"``,
the lazily set fields of ``_Driver``), against a real server.

The states the direct wake could get wrong are set up with public calls:

* a connection class whose ``get_reset_query()`` returns "" makes the
  release of a lease that ran a statement end its "reset" at once, in the
  releasing task (``Leaser.release``: nothing to send, then
  ``Runner.reset_done``), so that a waiter's task cancelled just before
  (its future cancelled, its handler not yet run) is still WAITING in the
  core when the connection is handed on: ``Runner.wake`` must pass it on
  to the next waiter, as the queued ``Wake`` did;
* a waiter whose deadline passed while the loop was blocked is granted
  before its timer fires (as before the cut);
* ``capture_stack`` toggled between acquires (the ``extras`` flag);
* ``reset_mode`` "rollback"/"auto" with a connection class that overrides
  ``get_reset_query`` (the reset text is planned per lease there).

Where asyncpg's pool has the same scenario the test runs on both
(``flavour``)."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


class EmptyReset(asyncpg.Connection):  # type: ignore[misc]
    """No reset statement at all: a release ends its reset in the releasing
    task (no round trip).

    asyncpg 0.29 names the method ``_get_reset_query()`` (0.30 made it
    public): with only ``get_reset_query()`` overridden, asyncpg 0.29 and
    safepool on it (``_internals.reset_query_getter``) run asyncpg's own
    reset query, a round trip, and none of the races below is reached."""

    def get_reset_query(self) -> str:
        return ""

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return ""


class CountedReset(asyncpg.Connection):  # type: ignore[misc]
    """A reset query of its own, which records that it ran."""

    def get_reset_query(self) -> str:
        return "RESET ALL"

    # asyncpg < 0.30 (see EmptyReset). Without it, on 0.29 the class has no
    # reset query of its own for safepool (_internals.overrides_reset_query)
    # and reset_mode="rollback" sends only a ROLLBACK: a SET survives the
    # lease, as documented for that mode (docs/migration.md).
    def _get_reset_query(self) -> str:
        return "RESET ALL"


async def _settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
def granted_cancels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The states of the waiters PoolState.cancel_waiter is called for:
    "granted" where the race under test was hit (the connection reserved for
    a waiter whose future was already cancelled)."""
    from safepool._state import PoolState

    seen: list[str] = []
    original = PoolState.cancel_waiter

    def recording(self: Any, waiter: Any, now: float) -> None:
        seen.append(waiter.state.value)
        original(self, waiter, now)

    monkeypatch.setattr(PoolState, "cancel_waiter", recording)
    return seen


def _check(pool: Any) -> None:
    if isinstance(pool, safepool.Pool):
        pool._state.check_invariants()


# ---------------------------------------------------------------- direct wake


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_a_waiter_cancelled_in_the_turn_of_its_grant_passes_the_connection_on(
    make_pool: Any, flavour: str, granted_cancels: list[str]
) -> None:
    pool = await make_pool(min_size=1, max_size=1, connection_class=EmptyReset)
    con = await pool.acquire()
    await con.execute("SET application_name = 'h219'")  # (a statement: the release resets)
    a = asyncio.ensure_future(pool.acquire())
    b = asyncio.ensure_future(pool.acquire())
    await _settle()
    assert not a.done() and not b.done()
    # Both in the same step: A's future is cancelled, its task not yet run,
    # when the release hands the connection on.
    a.cancel()
    await pool.release(con)
    with pytest.raises(asyncio.CancelledError):
        await a
    got = await asyncio.wait_for(b, 5)
    assert await got.fetchval("SELECT 1") == 1
    await pool.release(got)
    _check(pool)
    again = await asyncio.wait_for(pool.acquire(), 5)
    await pool.release(again)
    if flavour == "safepool":
        assert pool.get_idle_size() == pool.get_size() == 1
        assert pool._state.waiting == 0
        assert "granted" in granted_cancels  # (Runner.wake's InvalidStateError path)


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_every_waiter_cancelled_as_the_connection_comes_back_leaves_it_idle(
    make_pool: Any, flavour: str, granted_cancels: list[str]
) -> None:
    pool = await make_pool(min_size=1, max_size=1, connection_class=EmptyReset)
    con = await pool.acquire()
    await con.execute("SELECT 1")
    waiters = [asyncio.ensure_future(pool.acquire()) for _ in range(4)]
    await _settle()
    for waiter in waiters:
        waiter.cancel()
    await pool.release(con)
    for waiter in waiters:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    _check(pool)
    again = await asyncio.wait_for(pool.acquire(), 5)
    assert await again.fetchval("SELECT 2") == 2
    await pool.release(again)
    if flavour == "safepool":
        assert pool.get_idle_size() == 1 and pool._state.waiting == 0
        assert "granted" in granted_cancels


async def test_a_waiter_cancelled_as_a_real_reset_ends_passes_the_connection_on(pools: Any) -> None:
    """The same with asyncpg's own reset (a round trip): the head waiter is
    cancelled 0 to 11 loop passes after the release started, so that some
    cancels land before the reset's answer, some after the grant."""
    pool = await pools(min_size=1, max_size=1)
    for delay in range(12):
        con = await pool.acquire()
        await con.execute("SELECT 1")
        a = asyncio.ensure_future(pool.acquire())
        b = asyncio.ensure_future(pool.acquire())
        await _settle()
        release = asyncio.ensure_future(pool.release(con))
        for _ in range(delay):
            await asyncio.sleep(0)
        a.cancel()
        await release
        try:
            got_a = await a
        except asyncio.CancelledError:
            got_a = None
        if got_a is not None:
            # (A was granted before its cancel: it holds the connection.)
            await pool.release(got_a)
        got = await asyncio.wait_for(b, 5)
        await pool.release(got)
        _check(pool)
        assert pool._state.waiting == 0 and pool.get_idle_size() == 1, (delay, repr(pool))


@pytest.mark.realtime  # (a real 0.15 s block of the loop, past a 0.05 s acquire timeout)
async def test_a_waiter_past_its_deadline_but_not_yet_timed_out_is_still_granted(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1, connection_class=EmptyReset)
    con = await pool.acquire()
    await con.execute("SELECT 1")
    a = asyncio.ensure_future(pool.acquire(timeout=0.05))
    await _settle()
    time.sleep(0.15)  # noqa: ASYNC251 - the loop is blocked on purpose: A's timer cannot fire
    await pool.release(con)
    got = await asyncio.wait_for(a, 5)  # granted before its timeout was seen
    assert await got.fetchval("SELECT 1") == 1
    await pool.release(got)
    _check(pool)
    assert pool.get_idle_size() == 1 and pool._state.waiting == 0


@pytest.mark.parametrize("policy", [
    {"queue_policy": "adaptive"},
    {"max_site_share": 0.5},
    {"max_waiters": 1},
    {"fail_fast": True},
])
async def test_policies_after_a_cancel_in_the_turn_of_the_grant(
    pools: Any, policy: dict[str, Any], granted_cancels: list[str]
) -> None:
    pool = await pools(min_size=2, max_size=2, connection_class=EmptyReset, **policy)
    held = [await pool.acquire(site=f"h{i}") for i in range(2)]
    for con in held:
        await con.execute("SELECT 1")
    a = asyncio.ensure_future(pool.acquire(site="a"))
    await _settle()
    a.cancel()
    await pool.release(held[0])
    with pytest.raises(asyncio.CancelledError):
        await a
    b = await asyncio.wait_for(pool.acquire(site="b"), 5)
    await pool.release(b)
    await pool.release(held[1])
    _check(pool)
    assert pool.get_idle_size() == 2 and pool._state.waiting == 0
    assert "granted" in granted_cancels


async def test_resize_and_set_connect_args_do_not_leave_the_admission_checks_behind(pools: Any, pg_dsn: str) -> None:
    """max_waiters holds after resize() and set_connect_args() (the
    ``_admission`` flag is computed once)."""
    pool = await pools(min_size=1, max_size=1, max_waiters=1)
    pool.set_connect_args(pg_dsn)
    pool.resize(max_size=1, min_size=1)
    con = await pool.acquire()
    first = asyncio.ensure_future(pool.acquire())
    await _settle()
    with pytest.raises(safepool.PoolOverloadedError):
        await pool.acquire()
    await pool.release(con)
    await pool.release(await first)
    _check(pool)


# ------------------------------------------------------------------ extras


async def test_capture_stack_turned_on_and_off_between_acquires(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=2, capture_stack=False)
    assert pool.capture_stack is False
    async with pool.acquire():
        (info,) = pool.leases()
        assert info.stack is None
    pool.capture_stack = True
    async with pool.acquire():
        (info,) = pool.leases()
        assert info.stack and "test_capture_stack_turned_on_and_off_between_acquires" in info.stack
    con = await pool.acquire()  # (await, not async with)
    (info,) = pool.leases()
    assert info.stack and "test_capture_stack_turned_on_and_off" in info.stack
    await pool.release(con)
    pool.capture_stack = False
    async with pool.acquire():
        (info,) = pool.leases()
        assert info.stack is None
    assert pool._leaser.extras is False


async def test_capture_stack_off_keeps_leak_warnings_and_setup(pools: Any) -> None:
    ran: list[int] = []

    async def setup(con: Any) -> None:
        ran.append(1)

    pool = await pools(min_size=1, max_size=1, leak_warning_after=30, setup=setup)
    pool.capture_stack = False
    assert pool._leaser.extras is True
    async with pool.acquire():
        (info,) = pool.leases()
        assert info.stack is None
        assert pool._state._warnings.entries  # (the leak warning is armed)
    assert ran == [1]
    pool.capture_stack = True
    pool.capture_stack = False
    async with pool.acquire():
        assert pool._state._warnings.entries
    assert ran == [1, 1]


async def test_a_lease_timeout_alone_arms_the_deadline(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1, capture_stack=False)
    assert pool._leaser.extras is False
    con = await pool.acquire(lease_timeout=0.2)
    await asyncio.sleep(0.6)
    assert pool.stats().leases_expired == 1
    try:
        await pool.release(con)
    except Exception:
        pass


# ------------------------------------------------------------- reset modes


@pytest.mark.parametrize("mode", ["rollback", "auto", "full"])
@pytest.mark.parametrize("cls", [CountedReset, EmptyReset, asyncpg.Connection])
async def test_reset_modes_with_an_overridden_reset_query(pools: Any, mode: str, cls: type) -> None:
    pool = await pools(min_size=1, max_size=1, reset_mode=mode, connection_class=cls)
    for _ in range(2):
        async with pool.acquire() as con:
            await con.execute("SET work_mem = '7MB'")
            await con.execute("BEGIN")  # (left open: every mode rolls it back)
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT now() = statement_timestamp()") is not None
            in_tx = await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                                       "AND state LIKE 'idle in transaction%'")
            assert in_tx == 0
            work_mem = await con.fetchval("SHOW work_mem")
            if mode == "full" and cls is not EmptyReset:
                assert work_mem != "7MB"  # (RESET ALL, asyncpg's or the class's)
    _check(pool)


# ------------------------------------------------------------------ _Driver


async def _dirty_exit(pool: Any) -> Any:
    """The awaitable of ``async with pool.acquire()``'s exit after a SET:
    the release's ``_Driver`` (its reset's first step already sent)."""
    ctx = pool.acquire()
    con = await ctx.__aenter__()
    await con.execute("SET work_mem = '7MB'")
    return ctx.__aexit__(None, None, None)


async def _reset_was_run(pool: Any) -> None:
    async with pool.acquire(timeout=5) as again:
        assert await again.fetchval("SHOW work_mem") != "7MB"
    _check(pool)
    assert pool.get_idle_size() == pool.get_size() == 1 and pool._state.waiting == 0


async def test_a_release_awaited_twice_raises_the_second_time(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1)
    release = await _dirty_exit(pool)
    await release
    with pytest.raises(RuntimeError, match="cannot reuse already awaited"):
        await release
    await _reset_was_run(pool)


@pytest.mark.parametrize("how", ["task-cancelled-first", "close", "drop", "cancel", "wait_for", "gather"])
async def test_a_release_driven_oddly_still_resets_and_hands_the_connection_on(pools: Any, how: str) -> None:
    pool = await pools(min_size=1, max_size=1)
    waiter = asyncio.ensure_future(pool.acquire())  # (the direct wake's head waiter)
    release = await _dirty_exit(pool)
    if how == "task-cancelled-first":
        task = asyncio.ensure_future(release)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "close":
        release.close()
    elif how == "drop":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            del release
            gc.collect()
    elif how == "cancel":
        assert release.cancel() is False  # (not started: nothing to cancel)
        assert not release.done() and not release.cancelled()
        await release
    elif how == "wait_for":
        await asyncio.wait_for(release, 5)
    else:
        await asyncio.gather(release)
    con = await asyncio.wait_for(waiter, 5)
    assert await con.fetchval("SHOW work_mem") != "7MB"
    await pool.release(con)
    await _reset_was_run(pool)


async def test_a_release_cancelled_mid_reset_then_terminate(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=2)
    con = await pool.acquire()
    await con.execute("SELECT 1")
    task = asyncio.ensure_future(pool.release(con))
    await asyncio.sleep(0)
    task.cancel()
    pool.terminate()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    await _settle(20)
    assert pool.get_size() == 0 or pool.closed  # type: ignore[truthy-function]


# ------------------------------------------------------------------ stress


@pytest.mark.parametrize("options", [
    {},
    {"connection_class": EmptyReset},
    {"reset_mode": "auto"},
    {"reset_mode": "rollback", "connection_class": CountedReset},
    {"queue_policy": "adaptive"},
    {"max_site_share": 0.5},
    {"capture_stack": True, "leak_warning_after": 30},
])
async def test_random_contention_with_cancels_and_timeouts_loses_no_connection(
    pools: Any, options: dict[str, Any]
) -> None:
    """Many tasks on two connections: each lease dirties the session
    (a reset on release), some acquires time out, some tasks are cancelled
    at random points (while waiting, as they are granted, mid-release), and
    capture_stack flips now and then. At the end every connection is idle
    and the core's invariants hold."""
    import random

    rng = random.Random(219)
    pool = await pools(min_size=2, max_size=2, **options)
    served = 0

    async def worker(n: int) -> None:
        nonlocal served
        for _ in range(15):
            try:
                async with pool.acquire(timeout=rng.choice([None, 0.002, 0.05, 1.0]), site=f"s{n % 3}") as con:
                    await con.execute("SET work_mem = '5MB'")
                    if rng.random() < 0.3:
                        await asyncio.sleep(0)
                    served += 1
            except (TimeoutError, safepool.PoolTimeoutError, safepool.PoolOverloadedError):
                pass

    tasks = [asyncio.ensure_future(worker(n)) for n in range(12)]
    for step in range(200):
        await asyncio.sleep(0)
        if step % 7 == 0:
            victim = rng.choice(tasks)
            victim.cancel()
        if step % 23 == 0:
            pool.capture_stack = not pool.capture_stack
        if all(task.done() for task in tasks):
            break
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    await _settle(20)
    for _ in range(100):
        if pool.get_idle_size() == pool.get_size() == 2:
            break
        await asyncio.sleep(0.01)
    _check(pool)
    assert served > 0
    assert pool._state.waiting == 0 and pool.get_idle_size() == pool.get_size() == 2, repr(pool)
    cons = [await asyncio.wait_for(pool.acquire(site=f"end{i}"), 5) for i in range(2)]
    for con in cons:
        if options.get("connection_class") is not EmptyReset:
            assert await con.fetchval("SHOW work_mem") != "5MB"
        await pool.release(con)


# ------------------------------------------------------------- terminate


async def test_terminate_between_the_direct_wake_and_the_claim(pools: Any) -> None:
    """The waiter is woken by the release (its future done, its task not yet
    run), then the pool is terminated in the same step: its acquire must
    fail as a closed pool's, not hand out the terminated connection."""
    pool = await pools(min_size=1, max_size=1, connection_class=EmptyReset)
    con = await pool.acquire()
    await con.execute("SELECT 1")
    b = asyncio.ensure_future(pool.acquire())
    await _settle()
    await pool.release(con)  # (no round trip: B is granted now)
    pool.terminate()
    with pytest.raises(safepool.PoolClosedError):
        await asyncio.wait_for(b, 5)  # (as before the cut: pinned)
    assert pool.closed


async def test_terminate_while_a_reset_is_under_way_fails_the_waiter(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1)
    con = await pool.acquire()
    await con.execute("SELECT pg_sleep(0)")
    b = asyncio.ensure_future(pool.acquire())
    await _settle()
    release = asyncio.ensure_future(pool.release(con))
    await asyncio.sleep(0)  # (the reset sent, its answer not read)
    pool.terminate()
    with pytest.raises(safepool.PoolClosedError):
        await asyncio.wait_for(b, 5)
    try:
        await asyncio.wait_for(release, 5)
    except asyncpg.ConnectionDoesNotExistError:
        pass  # (as asyncpg's release of a terminated connection)
    assert pool.closed and pool.get_size() == 0


@pytest.mark.parametrize("cls", [asyncpg.Connection, EmptyReset])
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_waiters_are_served_in_arrival_order_through_resets(make_pool: Any, flavour: str, cls: type) -> None:
    """FIFO through the direct wake, each lease dirty (a reset per release),
    one waiter in the middle cancelled as the connection comes back: the
    others in arrival order, on both pools."""
    pool = await make_pool(min_size=1, max_size=1, connection_class=cls)
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with pool.acquire() as con:
            order.append(n)
            await con.execute("SET work_mem = '6MB'")

    con = await pool.acquire()
    await con.execute("SET work_mem = '6MB'")
    tasks = []
    for n in range(6):
        tasks.append(asyncio.ensure_future(waiter(n)))
        await _settle()
    tasks[0].cancel()
    await pool.release(con)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert isinstance(results[0], asyncio.CancelledError)
    assert order == [1, 2, 3, 4, 5]
    _check(pool)


async def test_a_setup_hook_that_fails_or_overruns_gives_the_connection_back(pools: Any) -> None:
    calls: list[str] = []

    async def setup(con: Any) -> None:
        calls.append("setup")
        if len(calls) == 1:
            raise ValueError("setup failed")
        if len(calls) == 2:
            await asyncio.sleep(1)
        await con.execute("SET work_mem = '9MB'")

    pool = await pools(min_size=1, max_size=1, setup=setup, capture_stack=False)
    assert pool._leaser.extras is True
    with pytest.raises(ValueError, match="setup failed"):
        await pool.acquire()
    with pytest.raises(asyncio.TimeoutError):
        await pool.acquire(timeout=0.1)
    await _settle(10)
    for _ in range(50):
        if pool.get_idle_size() == 1:
            break
        await asyncio.sleep(0.02)
    pool.capture_stack = True
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SHOW work_mem") == "9MB"
        (info,) = pool.leases()
        assert info.stack is not None
    _check(pool)
    assert pool.get_idle_size() == 1
