"""Lease timers in their queues and the heap, through the public API on a
real PostgreSQL: pool-level and per-acquire lease_timeout mixed, leak
warnings, late releases, expire_connections() and terminate()."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safepool import ManualClock
from safepool.events import LeakSuspected, LeaseEnded, LeaseExpired
from tests._util import line_of, until

pytestmark = pytest.mark.asyncio


async def settled(pool: Any) -> None:
    """Until no take-back or reset is under way. A ManualClock fires the
    pool's timers inside ``advance()``, and the events they emit are
    delivered there too; what runs on in the pool's tasks is a take-back's
    cancel and reset."""
    await until(lambda: pool.stats().resetting == 0)


def sites_at(pool: Any, lease_id: int) -> str | None:
    site: str | None = next(info.acquired_at for info in pool.leases(stacks=False) if info.id == lease_id)
    return site


async def test_mixed_lease_timeouts_fire_once_each_in_time_order(pools: Any) -> None:
    clock = ManualClock()
    start = clock.now()
    pool = await pools(min_size=4, max_size=4, lease_timeout=10.0, leak_warning_after=5.0, clock=clock)
    seen: list[tuple[float, str, int]] = []
    sites: dict[int, str] = {}

    def listen(event: Any) -> None:
        if isinstance(event, (LeakSuspected, LeaseExpired, LeaseEnded)):
            seen.append((clock.now() - start, event.kind, event.lease.id))
            sites[event.lease.id] = str(event.lease.acquired_at)

    pool.add_event_listener(listen)
    a = await pool.acquire()  # site-a
    b = await pool.acquire(
        lease_timeout=30.0,
    )  # site-b
    c = await pool.acquire(lease_timeout=2.0)  # site-c
    d = await pool.acquire(lease_timeout=None)  # site-d
    ids = dict(zip("abcd", (info.id for info in pool.leases()), strict=True))  # oldest first
    assert [info.acquired_at for info in pool.leases(stacks=False)] == [sites_at(pool, i) for i in ids.values()]
    expected = [
        (2.0, "lease_expired", ids["c"]),
        (5.0, "leak_suspect", ids["a"]),
        (5.0, "leak_suspect", ids["b"]),
        (5.0, "leak_suspect", ids["d"]),
        (10.0, "lease_expired", ids["a"]),
        (30.0, "lease_expired", ids["b"]),
    ]
    for second in range(1, 41):
        clock.advance(1.0)
        # Each second's timers fire inside advance(): no event may come late.
        assert seen == [event for event in expected if event[0] <= second]
        await settled(pool)
        pool._state.check_invariants()
    assert seen == expected
    here = __file__
    assert (
        sites[ids["a"]]
        == f"{here}:{line_of(__file__, '# site-a')} in test_mixed_lease_timeouts_fire_once_each_in_time_order"
    )
    assert sites[ids["b"]].startswith(f"{here}:{line_of(__file__, '# site-b') - 2} in ")  # the line of the call
    assert sites[ids["c"]].startswith(f"{here}:{line_of(__file__, '# site-c')} in ")
    for con in (a, b, c, d):  # expired ones: late releases, harmless
        await pool.release(con)
    await settled(pool)
    stats = pool.stats()
    assert stats.leases_expired == 3 and stats.in_use == 0 and stats.leak_warnings == 3
    pool._state.check_invariants()
    assert pool._state.next_deadline() is None


async def test_deadline_passing_during_release_does_not_fire(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, lease_timeout=3.0, leak_warning_after=1.0, clock=clock)
    expired: list[Any] = []
    pool.add_event_listener(lambda e: expired.append(e) if isinstance(e, LeaseExpired) else None)
    con = await pool.acquire()
    await con.execute("SET application_name = 'dirty'")  # its release resets
    releasing = asyncio.ensure_future(pool.release(con))
    await asyncio.sleep(0)
    clock.advance(10.0)
    await asyncio.wait_for(releasing, 5)
    assert pool.stats().idle == 1  # the reset is done: release() waited for it
    assert not expired and pool.stats().leases_expired == 0
    pool._state.check_invariants()
    async with pool.acquire() as again:
        assert await again.fetchval("SELECT 1") == 1
        clock.advance(0.5)
    clock.advance(10.0)  # would fire inside advance(), had the release left a timer
    assert not expired and pool.stats().idle == 1
    pool._state.check_invariants()


async def test_expire_connections_then_lease_expiry_and_terminate(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(min_size=2, max_size=3, lease_timeout=5.0, leak_warning_after=2.0, clock=clock)
    a = await pool.acquire()
    clock.advance(1.0)
    b = await pool.acquire(lease_timeout=2.0)  # due before a's deadline: the heap
    await pool.expire_connections()
    clock.advance(2.5)
    assert pool.stats().leases_expired == 1  # b at 3.0, inside advance()
    await settled(pool)
    pool._state.check_invariants()
    c = await pool.acquire()  # due at 8.5
    clock.advance(3.0)  # a expires at 5.0
    assert pool.stats().leases_expired == 2
    await settled(pool)
    pool._state.check_invariants()
    for con in (a, b):
        await pool.release(con)
    pool.terminate()
    clock.advance(100.0)
    assert pool.stats().leases_expired == 2
    await pool.release(c)
