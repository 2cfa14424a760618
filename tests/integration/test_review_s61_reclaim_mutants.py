"""Review s61 (helper-182), the rest of the hand-made mutation review of the
runtime modules (safepool/_workers.py, safepool/_reclaim.py, and what was
left open in safepool/_runner.py): behaviour no test caught when it was
broken on purpose (one small edit at a time, the tests that exercise the
function run against it). Each test here fails against the mutation named
in its docstring and passes against the code as it is. (The first part:
tests/integration/test_review_s61_runtime_mutants.py.)
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
import safepool._internals
import safepool._workers
from tests._util import until
from tests.faults._harness import PausedAfterPrepare
from tests.integration.test_overload_review import _queued

pytestmark = pytest.mark.asyncio


async def test_a_discarded_release_that_serves_a_capped_sites_waiter_closes_its_connection(
    pools: Callable[..., Any], server_count: Callable[[str], Any], app_name: str, pg_dsn: str,
) -> None:
    """max_size=2, max_site_share=0.5 (cap 1 a site), max_queries=1: site
    "a" holds one connection (its one query used it up) and a second task
    of site "a" waits at the cap while the other connection sits idle. The
    release ends the lease (the site is under its cap again: its waiter gets
    the idle connection) and discards the used-up connection (closed before
    release() returns, as asyncpg's): one hand-on, two actions, a Wake and
    then a Close. Both must be carried out: the waiter is served, the
    release returns, the connection is closed on the server, and the pool
    opens a replacement for min_size.

    Mutation killed (R08): ``Runner.after_hand_on``'s fast path without
    its ``len(actions) == 1`` condition: it granted the waiter and dropped
    the Close, so release() never returned and the used-up connection
    stayed open, counted as closing, for ever."""
    pool = await pools(min_size=2, max_size=2, max_site_share=0.5, max_queries=1)
    first = await pool.acquire(site="a")
    used_up = first.get_server_pid()
    assert await first.fetchval("SELECT 1") == 1  # its one query: discarded at release
    assert pool.stats().idle == 1
    waiter = asyncio.ensure_future(pool.acquire(site="a", timeout=5.0))
    await _queued(pool, 1)
    assert pool.stats().idle == 1  # (the capped site's waiter leaves it idle)
    await asyncio.wait_for(pool.release(first), 5.0)
    second = await asyncio.wait_for(waiter, 5.0)
    assert second.get_server_pid() != used_up
    assert await second.fetchval("SELECT 2") == 2
    await pool.release(second)
    admin = await asyncpg.connect(pg_dsn)
    try:
        async with asyncio.timeout(5.0):  # (the backend exits once it read the Terminate)
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", used_up):
                await asyncio.sleep(0.005)
    finally:
        await admin.close()
    stats = pool.stats()
    assert stats.in_use == 0 and stats.waiting == 0
    await until(lambda: pool.get_size() == 2)  # the replacement, for min_size
    assert await server_count(app_name) == 2


async def test_a_connect_cancelled_in_init_terminates_its_connection(pg_dsn: str, app_name: str) -> None:
    """terminate() while a connect's init= hook runs (it waits on the
    network, or here on an event): the connect task is cancelled in the
    hook, and the connection, already logged in, must be terminated with
    it. Nobody else holds it (the slot was discarded): left open, its
    backend stays logged in until the connection object is garbage
    collected (asyncpg's ResourceWarning "unclosed connection"), for ever
    while anything (the hook's closure, a kept traceback) refers to it.

    Mutation killed (W03): ``_workers.connect`` no longer terminates the
    connection when init= is cancelled (the connection stayed open, its
    backend idle on the server)."""
    entered = asyncio.Event()
    seen: list[Any] = []

    async def init(con: Any) -> None:
        seen.append(con)  # (a reference that outlives the connect: the test's)
        entered.set()
        await asyncio.Event().wait()

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, init=init, server_settings={"application_name": app_name},
    )
    acquire = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await asyncio.wait_for(entered.wait(), 5.0)
    pool.terminate()
    with pytest.raises(safepool.PoolClosedError):
        await acquire
    [con] = seen
    await until(con.is_closed)
    admin = await asyncpg.connect(pg_dsn)
    try:
        async with asyncio.timeout(5.0):  # (the backend exits once it saw the socket close)
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name):
                await asyncio.sleep(0.005)
    finally:
        await admin.close()


async def test_a_connect_the_server_answered_is_not_presumed_lost_while_init_runs(pg_dsn: str) -> None:
    """max_size=1, a ManualClock: an acquire's connect is logged in and in
    its init= hook (slow: it waits on a gate) when the acquire is cancelled;
    the next acquire takes the connect over. Past the hedge delay (0.1 s)
    an unanswered connect taken over is presumed lost (a black hole's) and
    cancelled; this one was answered (the server is there, the hook is just
    slow): it must be kept, and serve the acquire once init= ends, with
    init= run once and never cancelled. Presumed lost, it was cancelled in
    its hook and the acquire waited for a second login and a second init=.

    Mutation killed (W02): ``_workers.connect`` never reports
    ``connect_answered`` (the core's ``slot.answered`` stays False)."""
    clock = safepool.ManualClock()
    gate = asyncio.Event()
    entered = asyncio.Event()
    inits: list[int] = []
    cancelled: list[int] = []

    async def init(con: Any) -> None:
        inits.append(con.get_server_pid())
        entered.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.append(con.get_server_pid())
            raise

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, init=init, clock=clock)
    try:
        first = asyncio.ensure_future(pool.acquire(timeout=10.0))
        await asyncio.wait_for(entered.wait(), 5.0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        later = asyncio.ensure_future(pool.acquire(timeout=10.0))
        await _queued(pool, 1)
        clock.advance(1.0)  # ten hedge delays
        for _ in range(10):
            await asyncio.sleep(0)  # (an Abandon's cancellation would reach the hook now)
        gate.set()
        con = await asyncio.wait_for(later, 5.0)
        assert await con.fetchval("SELECT pg_backend_pid()") == inits[0]
        await pool.release(con)
        assert len(inits) == 1 and cancelled == []
        pool._state.check_invariants()
    finally:
        gate.set()
        pool.terminate()


async def test_terminate_right_after_a_release_whose_reset_runs_in_a_pool_task_lets_the_release_return(
    pg_dsn: str,
) -> None:
    """A reset= hook: a release's reset runs in a pool task, and release()
    waits for it. terminate() in the same loop step, before that task's
    first step, cancels it: its own handler (which settles the release's
    wait when terminate() cancels a reset under way) never runs. The
    release must return all the same (terminate() settles it), not wait for
    ever, and the hook never ran.

    Mutation killed (R39): ``Runner.terminate_all`` no longer settles
    ``resets_done`` (the releases waiting on a pool task's reset): the
    release never returned."""
    hooked: list[Any] = []

    async def reset(con: Any) -> None:
        hooked.append(con)

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset=reset)
    con = await pool.acquire()
    assert await con.fetchval("SELECT 1") == 1
    release = asyncio.ensure_future(pool.release(con))
    await asyncio.sleep(0)  # the release ran its first step: its reset task is spawned, not yet run
    [waiting] = pool._runner.resets_done.values()
    assert not waiting.done()
    pool.terminate()
    assert await asyncio.wait_for(release, 5.0) is None
    assert hooked == []
    assert pool.get_size() == 0


async def test_a_take_back_cancels_a_statement_begun_after_its_last_cancel_request_at_once(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease expires while its fetch is between its prepare and its bind
    (the protocol idle, the call under way): the take-back sends a cancel
    request at once, which the idle backend ignores, and must send another
    as soon as the call's next statement (here a minute of pg_sleep)
    starts, not only at its repeat interval (0.1 s doubling up to 2 s;
    made a minute here, so that only the at-once request can end the
    statement within the test).

    Mutation killed (W08): ``_workers._once_free`` no longer resets its
    timing for a new statement: the statement ran on until the interval's
    repeat (the take-back, and the connection's next lease, waited)."""
    monkeypatch.setattr(safepool._workers, "TAKE_BACK_CANCEL_INTERVAL", 60.0)
    monkeypatch.setattr(safepool._workers, "TAKE_BACK_CANCEL_MAX_INTERVAL", 60.0)
    delivered: list[int] = []
    request = safepool._internals.send_cancel_request

    async def counted(con: Any, key: Any) -> Any:
        result = await request(con, key)
        delivered.append(key[0])
        return result

    monkeypatch.setattr(safepool._internals, "send_cancel_request", counted)
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, connection_class=PausedAfterPrepare,
        server_settings={"application_name": app_name},
    )
    try:
        con = await pool.acquire(lease_timeout=10)
        pid = con.get_server_pid()
        raw = con._raw
        raw.paused, raw.go_on = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(con.fetchval("SELECT pg_sleep(60)"))
        await asyncio.wait_for(raw.paused.wait(), 5.0)
        clock.advance(11.0)  # the lease expires between the call's prepare and its bind
        await until(lambda: delivered == [pid])  # the first request: the backend idle, ignored
        go_on = raw.go_on
        raw.paused = raw.go_on = None
        go_on.set()
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(holder, 5.0)
        await until(lambda: delivered == [pid, pid])  # (its socket closed: delivered)
        async with pool.acquire(timeout=5.0) as next_lease:
            assert await next_lease.fetchval("SELECT pg_backend_pid()") == pid
    finally:
        pool.terminate()


@pytest.mark.safepool_allow_leaks  # the collected leak is on purpose
async def test_a_lost_proxys_connection_stays_leased_while_a_call_is_between_its_steps(pools: Callable[..., Any]) -> None:
    """A fetch-family call runs on the connection itself (the proxy's
    methods are the connection's), so the proxy may be garbage collected
    while the call is under way; here it is held between its prepare and
    its bind (the protocol idle). The pool must not reclaim the connection
    then: its reset would run between the call's steps, and the call's next
    step in whatever lease comes next. It stays leased (re-checked later)
    until the call has ended, then is reclaimed as a leak.

    Mutation killed (C08): ``Reclaimer.referred_to`` takes a call under way
    (``_internals.in_call``) for no use: the connection was reclaimed (reset
    and idled) under the paused call."""
    pool = await pools(min_size=1, max_size=1, connection_class=PausedAfterPrepare)
    [holder] = pool._runner.slot_holders.values()

    async def lose_the_proxy() -> tuple[asyncio.Task[Any], Any]:
        con = await pool.acquire(timeout=5.0)
        raw = con._raw
        raw.paused, raw.go_on = asyncio.Event(), asyncio.Event()
        call = asyncio.create_task(con.fetchval("SELECT 41 + 1"))
        await asyncio.wait_for(raw.paused.wait(), 5.0)
        return call, raw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        call, raw = await lose_the_proxy()
        go_on = raw.go_on
        del raw
        gc.collect()
        await until(lambda: holder.orphan_checks >= 1 or pool.stats().in_use == 0)
        assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
        go_on.set()
        assert await asyncio.wait_for(call, 5.0) == 42
        del call
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1
    async with pool.acquire(timeout=5.0) as con:
        assert await con.fetchval("SELECT 1") == 1


async def test_an_expired_leases_transaction_cannot_commit_while_the_take_back_runs(
    pools: Callable[..., Any], pg_dsn: str,
) -> None:
    """A lease expires with a transaction open (its insert not committed).
    The proxy refuses every call from the expiry on, but a transaction (or
    prepared statement) object runs on the connection itself: the expiry
    must invalidate it at once, not only once the take-back's reset is
    done. Its commit() in the expiry's loop step (before the take-back's
    first step) must raise asyncpg's InterfaceError, and the insert must
    never be committed: the lease had expired, its work is rolled back.

    Mutation killed (C13): ``Reclaimer.take_back`` no longer invalidates
    the lease's objects at the expiry (``_internals.invalidate_taken_back``;
    only the take-back's end does): the commit went through, the expired
    lease's row was committed."""
    table = f"review_s61_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE TABLE {table} (n int)")
    try:
        clock = safepool.ManualClock()
        pool = await pools(min_size=1, max_size=1, lease_timeout=5.0, clock=clock)
        con = await pool.acquire()
        tx = con.transaction()
        await tx.start()
        await con.execute(f"INSERT INTO {table} VALUES (1)")
        clock.advance(6.0)  # the lease expires: taken back
        with pytest.raises(asyncpg.InterfaceError):
            await tx.commit()
        await until(lambda: pool.stats().idle == 1)
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0
        async with pool.acquire() as fresh:
            assert not fresh.is_in_transaction()
        assert pool.stats().leases_expired == 1
    finally:
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()
