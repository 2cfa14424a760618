"""Review s61, the connect-side timers (helper-184): those the first timer
review (tests/integration/test_review_s61_timers.py) could not reach
because they need a server that never answers. Through the fault proxy's
black hole (it accepts and never answers), on a ``ManualClock``:

- the paced probe after a failure starts at ``backoff_until``, and a hedge
  beside an unanswered connect at ``Backoff.hedge_after`` (0.1 s) after the
  newest started (``PoolState._hedge_at``; README, ``max_connecting``:
  "hedged after 0.1 s without an answer"), up to ``max_size`` under way
  and no more than ``max_connecting``;
- a connect a waiting task took over, unanswered for the hedge delay, is
  presumed lost and cancelled then (``_lost_adopted_at``), and with a
  queue policy an orphaned one likewise (``_lost_orphan_at``); its taker's
  own connect starts once the cancellation ended it
  (docs/backpressure.md, "Connects that go unanswered").

Each instant is pinned as in the first review: ``EPS`` before it nothing
has started, at it the connect has. The pool never has more than
``max_size`` sockets open towards the server (the proxy's connections).
A timer re-armed for an instant already past would loop inside
``ManualClock.advance()``: :class:`GuardedClock` turns that into an error.
The mutation each test kills is named in its docstring (each was applied
by hand and the test seen to fail).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
from safepool import ManualClock
from tests._util import guarded_clock_class, step_to, until

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio]

GuardedClock = guarded_clock_class()

EPS = 2.0**-14  # (the backoff is milliseconds long)
HEDGE_AFTER = 0.1  # Backoff().hedge_after, the documented default


def connect_starts(pool: Any) -> list[float]:
    """When each connect under way (not given up) started, pool clock seconds, oldest first."""
    return sorted(
        slot.created_at for slot in pool._state.slots()
        if slot.state.value == "connecting" and not slot.abandoned
    )


async def until_accepted(proxy: FaultProxy, count: int) -> None:
    """Until the proxy has accepted ``count`` connections (each connect the
    pool starts reaches it within a few loop iterations)."""
    await until(lambda: proxy.accepted >= count)
    assert proxy.accepted == count


async def paced_pool_after_a_refusal(
    running: Cluster, proxy: FaultProxy, app_name: str, clock: ManualClock, **options: Any
) -> Any:
    """A ``fail_fast`` pool (paced connects) through ``proxy`` whose one
    connect so far was refused (the proxy not listening): one failure,
    its backoff running; then the proxy turns into a black hole."""
    pool = await safepool.create_pool(
        running.dsn(port=proxy.port), min_size=0, clock=clock, fail_fast=True,
        server_settings={"application_name": app_name}, **options,
    )
    async with proxy.refusing_new_connections():
        with pytest.raises(OSError):
            await asyncio.wait_for(pool.acquire(), 5)
    assert pool.stats().consecutive_connect_failures == 1
    proxy.blackhole = True
    return pool


async def test_a_paced_probe_starts_at_its_backoff_and_hedges_every_hedge_after_up_to_max_size(
    running: Cluster, app_name: str
) -> None:
    """``fail_fast=True``, ``max_size=3``: after a refused connect a task
    arrives during the backoff and waits for the probe, which starts at
    ``backoff_until`` exactly (not before); the black hole never answers
    it, so 0.1 s after it started a hedge starts beside it, and 0.1 s after
    that another: each at its instant, one at a time (README: "hedged after
    0.1 s without an answer"). With ``max_size`` connects under way no more
    start, however long they go unanswered (and no timer spins at a time
    already past), and the proxy never holds more than ``max_size``
    connections.

    Mutation killed: ``PoolState._hedge_at`` arms for the probe's start
    plus twice the hedge delay: the first hedge did not start at 0.1 s."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await paced_pool_after_a_refusal(running, proxy, app_name, clock, max_size=3)
        try:
            waiting = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            probe_at = pool._state.backoff_until
            assert clock.now() < probe_at <= clock.now() + 0.01  # (a refusal's backoff: within unreachable_cap)
            assert pool.stats().connecting == 0
            step_to(clock, probe_at - EPS)
            assert pool.stats().connecting == 0
            step_to(clock, probe_at)
            assert connect_starts(pool) == [probe_at]
            await until_accepted(proxy, 1)
            starts = [probe_at]
            for _ in range(2):
                hedge_at = starts[-1] + HEDGE_AFTER
                step_to(clock, hedge_at - EPS)
                assert connect_starts(pool) == starts
                step_to(clock, hedge_at)
                starts.append(hedge_at)
                assert connect_starts(pool) == starts
                await until_accepted(proxy, len(starts))
            clock.advance(100.0)  # (their connect timeout is 60 s of real time: still under way)
            await asyncio.sleep(0.05)
            assert connect_starts(pool) == starts and proxy.accepted == 3
            assert pool.stats().size == 3 and proxy.connections == 3
            assert not waiting.done()
        finally:
            waiting.cancel()
            pool.terminate()


async def test_max_connecting_bounds_the_hedges_of_a_paced_probe(running: Cluster, app_name: str) -> None:
    """``fail_fast=True``, ``max_size=4``, ``max_connecting=2``: the probe
    starts at its backoff, one hedge 0.1 s later, and then no more: two
    connects under way is ``max_connecting``'s bound, which hedges respect
    too (docs/backpressure.md: "also bounded by max_connecting"), and the
    timer is not re-armed for the hedge instant already past (it would
    fire again and again).

    Mutation killed: ``PoolState.next_deadline`` arms the hedge whatever
    ``max_connecting`` (its ``live < self.max_connecting`` test dropped):
    the timer was re-armed for the same past instant for ever
    (:class:`Spinning`)."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await paced_pool_after_a_refusal(running, proxy, app_name, clock, max_size=4, max_connecting=2)
        try:
            waiting = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            probe_at = pool._state.backoff_until
            step_to(clock, probe_at)
            assert connect_starts(pool) == [probe_at]
            hedge_at = probe_at + HEDGE_AFTER
            step_to(clock, hedge_at - EPS)
            assert connect_starts(pool) == [probe_at]
            step_to(clock, hedge_at)
            assert connect_starts(pool) == [probe_at, hedge_at]
            await until_accepted(proxy, 2)
            clock.advance(100.0)
            await asyncio.sleep(0.05)
            assert connect_starts(pool) == [probe_at, hedge_at]
            assert proxy.accepted == 2 and proxy.connections == 2 and pool.stats().size == 2
            assert not waiting.done()
        finally:
            waiting.cancel()
            pool.terminate()


@pytest.mark.parametrize("policy", [False, True], ids=["adopted", "orphan (max_site_share)"])
@pytest.mark.parametrize(
    "timeout",
    [100.0, None],
    ids=["taker with timeout", "taker without timeout"],
)
async def test_a_connect_taken_over_is_presumed_lost_at_its_hedge_delay_and_its_taker_connects(
    running: Cluster, app_name: str, policy: bool, timeout: float | None
) -> None:
    """By default (unpaced), ``max_size=1``, the network a black hole: a
    task's connect goes unanswered and the task is cancelled (an acquire
    that gave up); a task arriving 0.05 s later takes that connect over
    (with a queue policy, ``max_site_share``, it counts as the new task's
    supply: an orphan). 0.1 s after the connect started (``hedge_after``,
    not 0.1 s after the taker arrived) it is presumed lost: cancelled
    (``_lost_adopted_at``; with the policy ``_lost_orphan_at``), and the
    taker's own connect starts once the cancellation ended it, never
    beside it: the proxy never holds two connections for ``max_size=1``
    (docs/backpressure.md, "Connects that go unanswered").

    Mutation killed: ``PoolState._lost_adopted_at`` (with the policy,
    ``_lost_orphan_at``) returns the start plus twice the hedge delay: the
    connect was still under way at 0.1 s.

    Found by this review (fixed: ``PoolState.connects_to_watch``): a taker
    with no ``timeout=`` (asyncpg's default) left nothing armed. ``Leaser.acquire`` drains after ``enqueue`` only for
    actions, a waiter's deadline, connect failures or pending events
    ("none other depends on a waiter"), but the lost connect's deadline
    exists only once a task waits on it; nothing else arms the loop timer,
    so the connect was never presumed lost, and the taker waited for the
    lost connect's own timeout (60 s by default; on the loop's clock too:
    no second connect 3 s later, where a taker with a timeout got one
    0.05 s after it arrived)."""
    clock = GuardedClock()
    options: dict[str, Any] = {"max_site_share": 1.0} if policy else {}
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=1, clock=clock,
            server_settings={"application_name": app_name}, **options,
        )
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, proxy.connections)
                await asyncio.sleep(0.001)

        sampler = asyncio.ensure_future(sample())
        taker: asyncio.Future[Any] | None = None
        try:
            proxy.blackhole = True
            start = clock.now()
            first = asyncio.ensure_future(pool.acquire())
            await until_accepted(proxy, 1)
            assert connect_starts(pool) == [start]
            first.cancel()
            await asyncio.sleep(0)
            assert pool.stats().waiting == 0
            clock.advance(0.05)
            taker = asyncio.ensure_future(pool.acquire(timeout=timeout))
            await until(lambda: pool.stats().waiting == 1)
            lost_at = start + HEDGE_AFTER
            step_to(clock, lost_at - EPS)
            await asyncio.sleep(0.05)  # (an absence: no second connect)
            assert connect_starts(pool) == [start] and proxy.accepted == 1
            step_to(clock, lost_at)
            assert connect_starts(pool) == []  # given up: cancelled, counting until it ended
            assert pool.stats().size == 1
            await until_accepted(proxy, 2)  # the taker's own connect
            assert connect_starts(pool) == [lost_at]
            await until(lambda: proxy.connections == 1)
            await asyncio.sleep(0.05)
            assert pool.stats().size == 1 and proxy.connections == 1
            assert not taker.done()
            assert peak <= 1, f"the proxy held {peak} connections for max_size=1"
        finally:
            sampling = False
            await sampler
            if taker is not None:
                taker.cancel()
            pool.terminate()
