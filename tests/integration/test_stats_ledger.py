"""The lease ledger of ``pool.stats()``: every lease handed out is either
still held or ended in exactly one counter (docs/metrics.md), and counted
once in ``lease_duration``.

Found under chaos (pg_terminate_backend of leased backends): a lease the
pool ended because its connection died was in no counter, so
``acquired - released - leases_expired - leaks_detected - in_use`` drifted
up with every backend killed mid-lease (20 after 2,000 acquires), and a
dashboard reading it showed leases that did not exist.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool.stats import PoolStats
from tests._util import until

pytestmark = pytest.mark.asyncio


def ledger(pool: safepool.Pool) -> tuple[int, int]:
    s: PoolStats = pool.stats()
    ended = s.released + s.leases_expired + s.leaks_detected + s.leases_discarded
    return s.acquired, ended + len(pool.leases())


async def _queued(pool: safepool.Pool) -> asyncio.Task[Any]:
    """A task waiting in ``pool.acquire(timeout=5)``: the pool's clock (a
    ManualClock in these tests) decides when it times out."""

    async def acquire() -> Any:
        return await pool.acquire(timeout=5)

    waiting = asyncio.create_task(acquire())
    await until(lambda: pool.stats().waiting == 1)
    return waiting


async def test_a_lease_whose_backend_is_terminated_is_counted_once(
    pools: Callable[..., Any], pg_dsn: str, app_name: str
) -> None:
    pool = await pools(min_size=1, max_size=2)
    events: list[safepool.events.PoolEvent] = []
    pool.add_event_listener(events.append)
    con = await pool.acquire()
    pid = await con.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    # The server closes the socket; asyncpg notices and the pool ends the
    # lease (the application has not touched the connection yet).
    for _ in range(500):
        if pool.stats().in_use == 0:
            break
        await asyncio.sleep(0.01)
    stats = pool.stats()
    assert stats.in_use == 0 and stats.leases_discarded == 1
    acquired, accounted = ledger(pool)
    assert acquired == accounted == 1
    assert stats.lease_duration.count == 1
    await pool.release(con)  # a no-op: the lease had ended (late_release)
    stats = pool.stats()
    assert (stats.released, stats.leases_discarded) == (0, 1)
    assert [e.kind for e in events if e.kind == "late_release"] == ["late_release"]


async def test_terminate_counts_the_leases_it_ends(pools: Callable[..., Any]) -> None:
    pool = await pools(min_size=1, max_size=2)
    kept = await pool.acquire()
    returned = await pool.acquire()
    await pool.release(returned)
    pool.terminate()
    stats = pool.stats()
    assert (stats.acquired, stats.released, stats.leases_discarded) == (2, 1, 1)
    assert ledger(pool) == (2, 2)
    assert stats.lease_duration.count == 2
    await pool.release(kept)  # late: counted nowhere else
    assert pool.stats().released == 1


async def test_a_timeout_that_lost_the_race_to_a_cancel_is_not_counted(pools: Callable[..., Any]) -> None:
    """``wait_for(pool.acquire(timeout=t), t)``: the caller's cancel and the
    pool's deadline fall in the same loop turn. The caller gets
    CancelledError, never PoolTimeoutError, so neither acquire_timeouts nor
    the AcquireTimedOut event may count it (before: 1 and no event)."""
    clock = safepool.ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    events: list[safepool.events.PoolEvent] = []
    pool.add_event_listener(events.append)
    held = await pool.acquire()

    waiting = await _queued(pool)
    waiting.cancel()  # its future is cancelled now; the task has not run yet
    clock.advance(5)  # the pool's deadline fires before the task resumes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    stats = pool.stats()
    assert (stats.acquire_timeouts, stats.waiting) == (0, 0)
    assert [e for e in events if e.kind == "acquire_timeout"] == []

    # A timeout that does reach its caller is counted, once, with its event.
    waiting = await _queued(pool)
    clock.advance(5)
    with pytest.raises(safepool.PoolTimeoutError):
        await waiting
    assert pool.stats().acquire_timeouts == 1
    assert [e.kind for e in events if e.kind == "acquire_timeout"] == ["acquire_timeout"]
    await pool.release(held)


async def test_a_setup_timeout_is_counted_without_an_acquire_timeout_event(pools: Callable[..., Any]) -> None:
    """docs/metrics.md: acquire_timeouts counts a setup= hook that outran the
    timeout; the AcquireTimedOut event is for acquires that gave up waiting."""

    async def slow_setup(con: Any) -> None:
        await asyncio.sleep(5)

    pool = await pools(min_size=1, max_size=1, setup=slow_setup)
    events: list[safepool.events.PoolEvent] = []
    pool.add_event_listener(events.append)
    with pytest.raises(safepool.PoolTimeoutError):
        async with pool.acquire(timeout=0.05):
            pass
    # Until the pool is done with the aftermath (the hook's connection
    # closed, its replacement open and idle): an acquire_timeout event would
    # have been delivered by then (events follow the settled books).
    await until(lambda: pool.stats().idle == 1)
    stats = pool.stats()
    assert stats.acquire_timeouts == 1
    assert [e for e in events if e.kind == "acquire_timeout"] == []
    acquired, accounted = ledger(pool)
    assert acquired == accounted == 1


async def test_a_collected_proxy_still_in_use_is_not_a_leak_warning(pools: Callable[..., Any]) -> None:
    """Both kinds of ``leak_suspect`` event: only the leak_warning_after one
    is counted in leak_warnings, and dict listeners can tell them apart
    (before: the dict had no ``collected``, so counting dict events against
    safepool_leak_warnings_total came out one over per such proxy)."""
    pool = await pools(min_size=1, max_size=2)
    typed: list[safepool.events.PoolEvent] = []
    dicts: list[dict[str, Any]] = []
    pool.add_event_listener(typed.append)
    pool.add_listener(dicts.append)
    con = await pool.acquire()
    await con.add_listener("sp_ledger", lambda *args: None)  # keeps the connection in use
    del con
    gc.collect()
    for _ in range(100):
        if typed:
            break
        await asyncio.sleep(0.01)
    assert [(e.kind, getattr(e, "collected", None)) for e in typed] == [("leak_suspect", True)]
    assert [(d["event"], d["collected"]) for d in dicts] == [("leak_suspect", True)]
    stats = pool.stats()
    assert (stats.leak_warnings, stats.leaks_detected, stats.in_use) == (0, 0, 1)


@pytest.mark.parametrize(("mode", "expected"), [("full", (1, 1)), ("rollback", (0, 2))])
async def test_resets_skipped_counts_what_the_mode_did_not_reset(
    pools: Callable[..., Any], mode: str, expected: tuple[int, int]
) -> None:
    """docs/metrics.md: resets_skipped is not only 'the lease ran no
    statement': in rollback mode a lease that ran one outside a transaction
    needs no reset either."""
    pool = await pools(min_size=1, max_size=1, reset_mode=mode)
    async with pool.acquire():
        pass
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
    await until(lambda: pool.stats().idle == 1)  # (the release's reset, if any, done)
    stats = pool.stats()
    assert (stats.resets, stats.resets_skipped) == expected


async def test_acquire_timeouts_never_goes_down_when_a_cancel_follows_the_timeout(
    pools: Callable[..., Any],
) -> None:
    """The pool's deadline fires first, then the caller's own cancel (an
    ``asyncio.timeout`` with the same deadline) reaches the task before it
    resumes: the caller gets CancelledError and the timeout is not counted.
    It was counted at the deadline and taken back when the task resumed, so
    a read in between (a Prometheus scrape runs on the loop between any two
    callbacks) saw 1, the next 0: a counter reset to Prometheus, whose
    increase() then counts the whole cumulative value again."""
    from prometheus_client import CollectorRegistry

    from safepool.metrics.prometheus import register

    clock = safepool.ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    held = await pool.acquire()
    name = pool.name

    def scraped() -> float | None:
        return registry.get_sample_value("safepool_acquire_timeouts_total", {"pool": name})

    waiting = await _queued(pool)
    clock.advance(5)  # the pool's deadline: PoolTimeoutError set, the task not resumed yet
    between = (pool.stats().acquire_timeouts, scraped())
    waiting.cancel()  # the caller's own timeout, in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await waiting
    after = (pool.stats().acquire_timeouts, scraped())
    assert between == (0, 0) and after == (0, 0), (between, after)

    # A timeout that reaches its caller is counted once it does.
    waiting = await _queued(pool)
    clock.advance(5)
    with pytest.raises(safepool.PoolTimeoutError):
        await waiting
    assert (pool.stats().acquire_timeouts, scraped()) == (1, 1)
    await pool.release(held)
