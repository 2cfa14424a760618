"""Review s63, hand-made mutation review of safepool/health.py and
safepool/stats.py: each test here fails against the mutation named in its
docstring (one small edit of those files) and passes against the code as
it is, asserting what docs/metrics.md ("pool.stats()", "Health checks")
says. Time is the pool's ManualClock wherever it matters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from typing import Any

import asyncpg
import pytest

from safepool import ManualClock
from safepool.health import HealthReport, check_health
from tests._util import release_resetting_on_server, until
from tests.integration.test_overload_review import _queued

pytestmark = pytest.mark.asyncio

WINDOW = 60.0  # health()'s default connect_error_window


def codes(report: HealthReport) -> set[str]:
    return {reason.code for reason in report.reasons}


def reason(report: HealthReport, code: str) -> Any:
    (found,) = [r for r in report.reasons if r.code == code]
    return found


class Connect:
    """asyncpg.connect; refused while ``down``, a ``TypeError`` (the
    program's own bug) while ``bad``, and parked until ``gate`` is set
    while ``gate`` is clear (the connect is then under way)."""

    def __init__(self) -> None:
        self.down = False
        self.bad = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.parked = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise ConnectionRefusedError("connection refused (test)")
        if self.bad:
            raise TypeError("connect() got an unexpected keyword argument 'command_timout'")
        if not self.gate.is_set():
            self.parked += 1
            await self.gate.wait()
        return await asyncpg.connect(*args, **kwargs)


def terminate_while_the_loop_is_busy(pg_dsn: str, pid: int) -> None:
    """pg_terminate_backend(pid) on a loop of its own in another thread,
    while the caller's loop waits (blocked in join()): the pool has not read
    the backend's EOF when its next lease runs a query (as
    tests/integration/test_review_s59_asgi.py does by application_name)."""

    async def kill() -> None:
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            async with asyncio.timeout(5):
                while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                    await asyncio.sleep(0.01)
        finally:
            await admin.close()

    thread = threading.Thread(target=asyncio.run, args=(kill(),))
    thread.start()
    thread.join()


async def a_failed_connect(pool: Any, connect: Connect) -> None:
    """One refused connect on a pool with no connection open (min_size=0),
    then a connect that succeeds: connect_errors grows by one, and the run of
    failures ends (consecutive_connect_failures back to 0)."""
    before = pool.stats().connect_errors
    connect.down = True
    with pytest.raises(ConnectionRefusedError):
        await pool.fetchval("SELECT 1")
    connect.down = False
    assert await pool.fetchval("SELECT 1") == 1
    stats = pool.stats()
    assert stats.connect_errors == before + 1 and stats.consecutive_connect_failures == 0


# to_dict() --------------------------------------------------------------------------------------------------


async def test_to_dict_gives_each_distribution_its_six_documented_keys(pools: Any) -> None:
    """Mutation: health.py to_dict() drops "p99" from the distribution keys.
    Its docstring: "each distribution as count, sum, p50, p90, p99 and max,
    without its buckets"."""
    pool = await pools(name="dict")
    data = json.loads(json.dumps((await pool.health()).to_dict()))
    for name in ("acquire_wait", "lease_duration", "connect_time"):
        assert set(data["stats"][name]) == {"count", "sum", "p50", "p90", "p99", "max"}, name
    assert data["stats"]["lease_duration"]["count"] == 1  # the probe's lease


# closed -----------------------------------------------------------------------------------------------------


async def test_a_pool_that_is_closing_is_failing_closed_without_a_probe(pools: Any) -> None:
    """Mutation: health.py ``if pool.closed or pool.is_closing()`` loses its
    is_closing(). docs/metrics.md: ``closed`` (failing): "the pool is
    closed or closing"; close() waits for the lease held here."""
    pool = await pools(name="closing", min_size=1, max_size=1)
    held = await pool.acquire()
    closer = asyncio.ensure_future(pool.close())
    await until(pool.is_closing)
    assert not pool.closed
    report = await check_health(pool, probe=False)
    assert report.status == "failing" and codes(report) == {"closed"}
    assert reason(report, "closed").message == "pool 'closing' is closed or closing"
    await pool.release(held)
    await closer


async def test_a_pool_closed_while_the_probe_waits_is_failing_closed(pools: Any) -> None:
    """Mutation: health.py's probe answers PoolClosedError with a ``closed``
    reason that is degraded. The pool was open at the call; close() fails
    the probe's waiting acquire: ``closed`` is failing (docs/metrics.md)."""
    pool = await pools(name="closed-under-probe", min_size=1, max_size=1)
    held = await pool.acquire()
    report_task = asyncio.ensure_future(pool.health(probe_timeout=5.0))
    await _queued(pool, 1)
    closer = asyncio.ensure_future(pool.close())
    report = await report_task
    assert codes(report) == {"closed"} and report.status == "failing" and not report.ready
    assert reason(report, "closed").status == "failing"
    assert report.probe_latency is None
    await pool.release(held)
    await closer


# The server's state -------------------------------------------------------------------------------------------


async def test_server_down_alone_is_failing(pools: Any) -> None:
    """Mutation: health.py's ``server_down`` reason is degraded. Without the
    probe (whose own failure made the existing test's report failing anyway),
    server_down alone must fail the pool: docs/metrics.md, "server_down |
    failing"."""
    connect = Connect()
    connect.down = True
    pool = await pools(name="down-alone", min_size=0, connect=connect)
    with pytest.raises(ConnectionRefusedError):
        await pool.fetchval("SELECT 1")
    report = await pool.health(probe=False)
    assert codes(report) == {"server_down", "connect_errors"}
    assert reason(report, "server_down").status == "failing"
    assert report.status == "failing" and not report.ready


async def test_init_failed_with_only_a_connect_under_way_is_failing(pools: Any) -> None:
    """Mutation: health.py ``serving = stats.size - stats.connecting -
    stats.closing`` loses ``- stats.connecting``. The init hook failed, and
    the pool's only slot is a connect under way (its init hook still
    running): no connection serves, so ``init_failed`` is failing ("failing
    with no connection left", docs/metrics.md), "0 connections open"."""
    release = asyncio.Event()
    calls = 0

    async def init(con: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            await release.wait()
        raise ValueError("bug in init hook")

    pool = await pools(name="init-connecting", min_size=0, max_size=1, init=init)
    with pytest.raises(ValueError, match="bug in init hook"):
        await pool.acquire(timeout=10)
    second = asyncio.ensure_future(pool.acquire(timeout=10))
    await until(lambda: calls == 2)
    report = await pool.health(probe=False)
    assert report.stats.init_failing and report.stats.connecting == 1 and report.stats.size == 1
    failed = reason(report, "init_failed")
    assert failed.status == "failing" and report.status == "failing"
    assert failed.message.endswith("; 0 connections open"), failed.message
    release.set()
    with pytest.raises(ValueError, match="bug in init hook"):
        await second


async def test_connect_misconfigured_beside_an_open_connection_is_degraded(pools: Any) -> None:
    """Mutation: health.py tests ``connect_misconfigured`` only while the
    server is "down" (not "backing_off"). docs/metrics.md: it is reported
    in place of ``server_down`` or ``server_backing_off``, "failing with no
    connection left, else degraded"."""
    connect = Connect()
    pool = await pools(name="misconfigured-open", min_size=1, max_size=2, connect=connect, clock=ManualClock(),
                       wait_on_connect_error=True)
    held = await pool.acquire()
    connect.bad = True
    second = asyncio.ensure_future(pool.acquire(timeout=10))
    await until(lambda: pool.stats().connect_errors == 1)
    await pool.release(held)
    try:
        await pool.release(await second)
    except TypeError:
        pass  # (the program's own error reaches the acquire that asked for the connect)
    report = await pool.health()
    assert report.stats.server_status == "backing_off" and report.stats.connect_misconfigured
    assert codes(report) == {"connect_misconfigured", "connect_errors"}
    misconfigured = reason(report, "connect_misconfigured")
    assert misconfigured.status == "degraded" and report.status == "degraded"
    assert "open connections: 1" in misconfigured.message
    connect.bad = False


async def test_server_backing_off_does_not_count_a_connect_under_way_as_open(pools: Any) -> None:
    """Mutation: health.py's ``server_backing_off`` message counts
    ``stats.size`` (a connect under way included) where it counted
    ``stats.size - stats.connecting``: one connection is open, the other
    slot is a connect the server has not answered ("1 connection still
    open", not 2)."""
    clock = ManualClock()
    connect = Connect()
    pool = await pools(name="backing-off-connecting", min_size=1, max_size=2, connect=connect, clock=clock,
                       wait_on_connect_error=True)
    held = await pool.acquire()
    connect.down = True
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().connect_errors == 1)
    connect.down = False
    connect.gate.clear()
    clock.advance(30.0)  # past the backoff: the pool connects again for its waiter
    await until(lambda: connect.parked == 1)
    report = await pool.health(probe=False)
    assert report.stats.server_status == "backing_off"
    assert report.stats.size == 2 and report.stats.connecting == 1
    message = reason(report, "server_backing_off").message
    assert message.endswith("; 1 connection still open"), message
    # A connection being closed is not open either (as `serving` counts for
    # the other reasons): the same pool's stats with one more slot closing.
    real_stats = pool.stats
    pool.stats = lambda: dataclasses.replace(real_stats(), size=3, closing=1)  # type: ignore[method-assign]
    try:
        report = await pool.health(probe=False)
    finally:
        del pool.stats
    assert report.stats.closing == 1
    message = reason(report, "server_backing_off").message
    assert message.endswith("; 1 connection still open"), message
    connect.gate.set()
    await pool.release(held)
    await pool.release(await waiter)


# saturated and leak_suspects ----------------------------------------------------------------------------------


async def test_saturated_means_waited_longer_than_saturated_after_and_counts_right(pools: Any) -> None:
    """Mutations: health.py ``oldest_wait_age > saturated_after`` made
    ``>=``; the message's waiting count read from ``stats.in_use``; its
    "of max_size" read from ``stats.size``. docs/metrics.md: saturated
    when "a task has waited longer than saturated_after". Two tasks of a
    site at its cap (max_site_share) wait while the pool has room: 1
    connection of max_size 2 in use, size 1."""
    clock = ManualClock()
    pool = await pools(name="saturated", min_size=1, max_size=2, max_site_share=0.5, clock=clock)
    held = await pool.acquire(site="orders")
    waiters = [asyncio.ensure_future(pool.acquire(timeout=None, site="orders")) for _ in range(2)]
    await _queued(pool, 2)
    clock.advance(5.0)
    report = await pool.health(probe=False, saturated_after=5.0)
    assert report.stats.oldest_wait_age == 5.0 and report.status == "ok", report.reasons
    clock.advance(0.5)
    report = await pool.health(probe=False, saturated_after=5.0)
    assert (report.stats.size, report.stats.in_use, report.stats.waiting) == (1, 1, 2)
    assert reason(report, "saturated").message == (
        "2 tasks waiting for a connection, the first for 5.5s; 1 of max_size 2 in use"
    )
    await pool.release(held)
    for waiter in waiters:
        await pool.release(await waiter)


async def test_leak_suspects_counts_the_suspects_and_names_the_oldest_and_its_task(pools: Any) -> None:
    """Mutations: health.py names ``suspects[-1]`` (the youngest suspect)
    where it named ``suspects[0]``; counts ``stats.in_use`` where it counted
    the suspects; leaves out the task's name. Three leases, two older than
    the threshold: "2 leases", the oldest's age, site and task
    (docs/metrics.md: "the message names the oldest one's acquire site and
    task")."""
    clock = ManualClock()
    pool = await pools(name="suspects", min_size=3, max_size=3, clock=clock, leak_warning_after=30.0)

    async def lease() -> Any:
        return await pool.acquire()  # suspect-site marker

    first = await asyncio.create_task(lease(), name="oldest-holder")
    clock.advance(10.0)
    second = await asyncio.create_task(lease(), name="younger-holder")
    clock.advance(31.0)
    third = await asyncio.create_task(lease(), name="fresh-holder")
    report = await pool.health(probe=False)
    message = reason(report, "leak_suspects").message
    assert message.startswith("2 leases held longer than 30s; oldest 41.0s, acquired at "), message
    assert "in lease" in message and message.endswith(", task oldest-holder"), message
    for con in (first, second, third):
        await pool.release(con)


# The probe ----------------------------------------------------------------------------------------------------


async def test_a_probe_that_retried_on_a_lost_connection_then_got_none_is_probe_no_connection(
    pg_dsn: str, pools: Any,
) -> None:
    """Mutation: health.py's probe loop no longer sets ``acquired = False``
    at each attempt. The probe's first connection was lost under its query
    (its backend terminated); its retry then got no connection within
    probe_timeout (the pool's reconnect hangs): that is
    ``probe_no_connection`` (degraded: "the probe got no connection within
    probe_timeout"), not ``probe_timeout`` (a query that did not answer)."""
    connect = Connect()
    pool = await pools(name="lost-then-none", min_size=1, max_size=1, connect=connect)
    async with pool.acquire() as con:
        pid = con.get_server_pid()
    connect.gate.clear()  # from here a connect hangs
    terminate_while_the_loop_is_busy(pg_dsn, pid)
    report = await pool.health(probe_timeout=0.3)
    assert codes(report) == {"probe_no_connection"}, report.reasons
    assert reason(report, "probe_no_connection").message == "the probe got no connection within 0.3s"
    assert report.status == "degraded"
    connect.gate.set()


async def test_a_probe_refused_by_deadline_aware_admission_says_so(pools: Any) -> None:
    """Mutation: health.py no longer recognises the adaptive queue's
    deadline-aware refusal (its message read "the wait queue is full",
    with no max_waiters set). Ten waiters were handed a connection 0.5 s apart
    (the measured drain rate); the probe, with 0.3 s and a task ahead,
    cannot be served in time and is refused at once (docs/backpressure.md)."""
    clock = ManualClock()
    pool = await pools(name="admission", min_size=1, max_size=1, queue_policy="adaptive", queue_target=1.0,
                       queue_interval=10.0, clock=clock)
    con = await pool.acquire()
    tasks = [asyncio.ensure_future(pool.acquire()) for _ in range(10)]  # (8 gaps measured at least)
    await _queued(pool, 10)
    for task in tasks:
        clock.advance(0.5)
        await pool.release(con)
        con = await task
    patient = asyncio.ensure_future(pool.acquire(timeout=None))  # a task ahead of the probe
    await _queued(pool, 1)
    report = await pool.health(probe_timeout=0.3)
    assert report.stats.admission_rejections == 1, report.reasons
    assert reason(report, "probe_no_connection").message == (
        "the probe got no connection: the adaptive queue refused it "
        "(not servable within probe_timeout at the drain rate)"
    )
    await pool.release(con)
    await pool.release(await patient)


async def test_a_probe_error_reports_its_first_line_only(pools: Any) -> None:
    """Mutation: health.py reports the whole ``str(exc)`` of the probe's
    error, where it took its first line. docs/metrics.md: messages carry
    "the first line of an error message" (asyncpg appends DETAIL and HINT
    on lines of their own)."""
    pool = await pools(name="multiline")
    report = await pool.health(
        probe_query="DO $$ BEGIN RAISE EXCEPTION 'first line' USING DETAIL = 'a detail line'; END $$"
    )
    assert reason(report, "probe_failed").message == "the probe failed: RaiseError: first line"
    assert report.status == "failing"


# connect_errors: the window between checks ---------------------------------------------------------------------


async def window_pool(pools: Any, name: str) -> tuple[Any, Connect, ManualClock]:
    clock = ManualClock()
    connect = Connect()
    pool = await pools(name=name, min_size=0, max_size=1, connect=connect, clock=clock)
    return pool, connect, clock


async def check_at(pool: Any, clock: ManualClock, start: float, at: float) -> HealthReport:
    """``health(probe=False)`` with the pool's clock ``at`` seconds after ``start``."""
    clock.advance(start + at - clock.now())
    report = await pool.health(probe=False)
    assert report.stats.taken_at == start + at
    return report


async def test_connect_errors_are_counted_from_the_newest_check_at_least_a_window_old(pools: Any) -> None:
    """Mutations of health.py's ``_recent_connect_errors``: the baseline
    sample dropped when only the oldest sample is past the window's start
    (``samples[0][0] <= now - window``); a baseline kept only within one
    window (not two). docs/metrics.md: counted "from the newest check at
    least this old". Checks at 0, 50 and 100 s, the error at 5 s: at 100 s
    the newest check at least 60 s old is the one at 0 s, 100 s back (within
    twice the window): the error counts."""
    pool, connect, clock = await window_pool(pools, "window-0-50-100")
    start = clock.now()
    assert "connect_errors" not in codes(await check_at(pool, clock, start, 0.0))
    clock.advance(5.0)
    await a_failed_connect(pool, connect)
    assert reason(await check_at(pool, clock, start, 50.0), "connect_errors").message == (
        "1 connect error in the last 50s; 1 since the pool started"
    )
    assert reason(await check_at(pool, clock, start, 100.0), "connect_errors").message == (
        "1 connect error in the last 100s; 1 since the pool started"
    )


async def test_a_check_exactly_a_window_old_is_the_baseline(pools: Any) -> None:
    """Mutations: health.py ``samples[1][0] <= now - window`` made ``<``;
    the loop keeping two samples (``len(samples) > 2``). Checks at 0, 30 and
    90 s, the error at 5 s: at 90 s the check at 30 s is exactly a window
    old, "at least this old", so it is the baseline and no error came since."""
    pool, connect, clock = await window_pool(pools, "window-0-30-90")
    start = clock.now()
    await check_at(pool, clock, start, 0.0)
    clock.advance(5.0)
    await a_failed_connect(pool, connect)
    assert "connect_errors" in codes(await check_at(pool, clock, start, 30.0))
    report = await check_at(pool, clock, start, 90.0)
    assert "connect_errors" not in codes(report), report.reasons
    assert report.status == "ok"


async def test_a_check_more_than_twice_the_window_after_the_last_sees_the_current_run_only(pools: Any) -> None:
    """Mutation: health.py's baseline kept within ``3 * window`` (not
    ``2 * window``). docs/metrics.md: "one over twice the window after the
    last, counts the current run of failures only": the run ended (a
    connect succeeded), so nothing at 150 s."""
    pool, connect, clock = await window_pool(pools, "window-0-150")
    start = clock.now()
    await check_at(pool, clock, start, 0.0)
    clock.advance(5.0)
    await a_failed_connect(pool, connect)
    report = await check_at(pool, clock, start, 150.0)
    assert "connect_errors" not in codes(report), report.reasons


async def test_the_history_keeps_every_check_within_the_window(pools: Any) -> None:
    """Mutation: health.py's per-pool history bounded to 2 samples (not
    256). Checks at 0, 10, 20 and 30 s, the error at 5 s: every one of them
    counts it from the check at 0 s."""
    pool, connect, clock = await window_pool(pools, "window-every-10")
    start = clock.now()
    await check_at(pool, clock, start, 0.0)
    clock.advance(5.0)
    await a_failed_connect(pool, connect)
    for at in (10.0, 20.0, 30.0):
        assert reason(await check_at(pool, clock, start, at), "connect_errors").message == (
            f"1 connect error in the last {at:.0f}s; 1 since the pool started"
        )


async def test_a_first_check_counts_the_current_run_only_and_up_to_exactly_a_window(pools: Any) -> None:
    """Mutations: health.py's first check counts ``stats.connect_errors``
    (every error since the pool started) where it counted the current run
    (``consecutive_connect_failures``); its message's "since the pool
    started" reads the run; ``age <= window`` made ``<``. One error, a
    success, then a run of two: "2 connect errors in a row", "3 since the
    pool started", still so when the last failed exactly a window ago
    ("counted if its last failure is within the window")."""
    clock = ManualClock()
    connect = Connect()
    pool = await pools(name="first-check-run", min_size=0, max_size=1, connect=connect, clock=clock)
    await a_failed_connect(pool, connect)
    await pool.expire_connections()  # the next query connects again
    connect.down = True
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            await pool.fetchval("SELECT 1")
        clock.advance(30.0)  # past the backoff
    clock.advance(WINDOW - 30.0)
    report = await pool.health(probe=False)
    assert report.stats.last_connect_failure_age == WINDOW
    assert (report.stats.connect_errors, report.stats.consecutive_connect_failures) == (3, 2)
    assert reason(report, "connect_errors").message == (
        "2 connect errors in a row (first check of this pool); 3 since the pool started"
    )
    connect.down = False


# stats() ------------------------------------------------------------------------------------------------------


async def test_oldest_lease_age_is_the_oldest_leases(pools: Any) -> None:
    """Mutation: stats.py ``oldest = min(...)`` made ``max``: the age of the
    youngest lease. docs/metrics.md: "age of the oldest lease held now (0
    when none)"."""
    clock = ManualClock()
    pool = await pools(name="oldest", min_size=2, max_size=2, clock=clock)
    first = await pool.acquire()
    clock.advance(7.0)
    second = await pool.acquire()
    clock.advance(3.0)
    assert pool.stats().oldest_lease_age == 10.0
    await pool.release(first)
    assert pool.stats().oldest_lease_age == 3.0
    await pool.release(second)
    assert pool.stats().oldest_lease_age == 0.0


async def test_a_connection_whose_reset_runs_is_resetting_not_idle(pg_dsn: str, app_name: str) -> None:
    """Mutations: stats.py counts a resetting connection as idle too
    (``idle=state.idle + resetting``); ``resetting`` read from the
    CONNECTING slots. docs/metrics.md: ``resetting``, "released (or taken
    back); the session reset runs in the pool's task", ``idle``, "connected,
    ready to hand out". The one connection's reset runs on the server."""
    async with release_resetting_on_server(pg_dsn, app_name) as (pool, _, clock, _, release):
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use, stats.resetting, stats.connecting, stats.closing) == (
            1, 0, 0, 1, 0, 0,
        )
        clock.advance(30.0)  # the reset watchdog aborts the reset
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release, 5)


async def test_a_connect_error_counted_over_less_than_a_second_is_not_said_to_be_in_the_last_0s(pools: Any) -> None:
    """health()'s message printed a span under half a second as "in the
    last 0s" (review h271): under a second it gives tenths, at least 0.1."""
    pool, connect, clock = await window_pool(pools, "window-short")
    start = clock.now()
    await check_at(pool, clock, start, 0.0)
    await a_failed_connect(pool, connect)
    for at, said in ((0.004, "0.1s"), (0.4, "0.4s"), (0.96, "1.0s"), (1.4, "1s")):
        assert reason(await check_at(pool, clock, start, at), "connect_errors").message == (
            f"1 connect error in the last {said}; 1 since the pool started"
        )
