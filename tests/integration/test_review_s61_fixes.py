"""Review s61 of the session's timer fixes (helper-186): what the fixes'
own tests left unpinned. Against the real server.

``PoolState.connects_to_watch`` is set by ``enqueue`` when the new waiter
depends on a connect under way, and ``Leaser.acquire`` drains and clears
it. Left set, every later acquire that queues would drain (the whole
action dispatch and ``arm_timer``'s heap scan on the contended hot path,
docs/performance.md, "The hot path's bytecode budget").

``PoolState.idle_expiry``, which a release that idles a connection now
asks whether to re-arm the pool's timer, keeps asyncpg's meaning of
``max_inactive_connection_lifetime=0``: never.

(The reset watchdog's re-arm and the idle expiry's firing instants are
pinned by tests/integration/test_review_s61_timers.py and
test_review_s61_timers_2.py; the queue-policy gap this review found is in
tests/faults/test_review_s61_fixes_faults.py: it needs the fault proxy.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
from tests._util import until

pytestmark = pytest.mark.asyncio


async def test_a_queued_acquire_behind_busy_connections_does_not_drain_after_one_that_watched_a_connect(
    pg_dsn: str, app_name: str
) -> None:
    """``max_size=2``, ``min_size=0``: the first acquire finds no
    connection and queues behind its own connect (``enqueue`` sets
    ``connects_to_watch``: a connect is under way), the second likewise.
    Once both hold their connections the flag is down again, and a third
    acquire (no ``timeout=``: no deadline of its own), queued behind the
    two busy connections with no connect under way, does not drain: the
    contended hot path, whose only work is the queue entry. Its release
    hand-on then serves it as usual.

    Mutation killed: ``Leaser.acquire`` no longer clears the flag
    (``state.connects_to_watch = False`` dropped): it stayed set after the
    first acquire and every later queued acquire drained."""
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=2, server_settings={"application_name": app_name})
    try:
        first, second = await asyncio.gather(pool.acquire(), pool.acquire())
        assert pool.stats().connecting == 0
        leaser = pool._leaser
        drained = 0
        drain = leaser.drain

        def counting_drain() -> None:
            nonlocal drained
            drained += 1
            drain()

        leaser.drain = counting_drain
        try:
            third: asyncio.Future[Any] = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            assert drained == 0, "a queued acquire with nothing to arm drained"
            assert pool._state.connects_to_watch is False
        finally:
            leaser.drain = drain
        await pool.release(first)
        served = await asyncio.wait_for(third, 5)
        await pool.release(served)
        await pool.release(second)
        await pool.close()
    finally:
        pool.terminate()  # (a failure above left leases held: close() would wait for them)


async def test_max_inactive_connection_lifetime_0_keeps_a_connection_idled_behind_an_armed_timer(
    pools: Any, app_name: str
) -> None:
    """``max_inactive_connection_lifetime=0`` disables idle expiry (asyncpg's
    pool: 0 means never). A release that idles a connection above
    ``min_size`` while the pool's timer is armed for a later item (the
    other lease's ``lease_timeout``) asks ``PoolState.idle_expiry`` whether
    the idle connection is due before it: with 0 it never is, and the
    connection is still idle (and nothing spins) a long time later, up to
    the lease deadline and after it.

    Mutation killed: ``PoolState.idle_expiry`` without its
    ``max_inactive_lifetime`` truth test (a lifetime of 0 read as 0 s): the
    release armed the timer for the instant it idled the connection, which
    found nothing to close (``advance`` keeps the test) and was re-armed for
    that instant for ever (``Spinning``)."""
    from tests.integration.test_review_s61_timers_2 import GuardedClock

    clock = GuardedClock()
    pool = await pools(
        min_size=0, max_size=2, max_inactive_connection_lifetime=0, lease_timeout=100.0, clock=clock,
        server_settings={"application_name": app_name},
    )
    kept, released = await pool.acquire(), await pool.acquire()
    await pool.release(released)
    assert pool.stats().idle == 1 and pool._runner.timer_at == pytest.approx(clock.now() + 100.0)
    clock.advance(50.0)
    assert pool.stats().idle == 1 and pool.stats().size == 2
    clock.advance(100.0)  # (the lease deadline fired: kept is taken back)
    await until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0)
    assert pool.stats().size == 2 and pool.stats().connections_closed == 0
    with pytest.raises(safepool.LeaseExpiredError):
        await kept.fetchval("SELECT 1")
