"""Review s61, the drain audit (helper-187): every call from the I/O layer
into a ``PoolState`` method that can append actions or move
``next_deadline()`` earlier, and whether its caller drains (or arms the
pool's timer) afterwards. The calls that skip ``drain()`` are the hot
paths (``Runner.after_hand_on``'s one-``Wake`` path, the inline reset's
``state.release``, ``try_acquire``, ``claim``, ``enqueue`` without a flag),
``connect_answered`` (it only moves a deadline later) and the min_size
upkeep: ``Runner.restore_floor`` calls ``plan_floor_connect`` and starts
its connect with no drain. A random walk of the state core with the
runner's timer modelled beside it (which drains where the runner does)
found no deadline left without an armed timer at or before it.

The upkeep's connect reaches a waiting task in two ways, pinned here on a
real server through the fault proxy's black hole and a ``ManualClock``
(the upkeep's own retry delay is loop time: about 1 s of real time):

- unpaced (the default), every waiting task has a connect of its own
  while the pool has room, so ``plan_floor_connect``'s ``_adopt`` finds
  nobody; a task arriving later takes the upkeep's connect over in
  ``enqueue`` (``connects_to_watch``: the acquire drains), and the connect
  is presumed lost at its hedge delay;
- paced (``wait_on_connect_error``), a task arriving in the backoff has
  no connect, and ``plan_floor_connect`` hands it the upkeep's connect
  with no drain: the timer is armed already, for the backoff's end (the
  acquire drained for it: connect failures), which then re-arms it for
  the hedge beside the lost connect.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import safepool
from tests._util import step_to, until

from ._pg import Cluster
from ._proxy import FaultProxy
from .test_review_s61_connect_timers import EPS, HEDGE_AFTER, GuardedClock, connect_starts, until_accepted

pytestmark = [pytest.mark.asyncio]


async def refused_once(pool: Any, proxy: FaultProxy) -> None:
    """One connect refused (the proxy not listening): the acquire that
    opened it fails, the pool counts one failure and its backoff runs."""
    async with proxy.refusing_new_connections():
        with pytest.raises(OSError):
            await asyncio.wait_for(pool.acquire(), 5)
    assert pool.stats().consecutive_connect_failures == 1


async def test_the_floor_upkeeps_connect_taken_over_by_a_task_is_presumed_lost_at_its_hedge_delay(
    running: Cluster, app_name: str
) -> None:
    """Unpaced, ``max_size=1``: a connect was refused, then ``min_size``
    is raised to 1, so the min_size upkeep (``Runner.restore_floor``, which
    retries the floor on its own schedule while connects fail) opens a
    connect for nobody, into a black hole. A task with no ``timeout=``
    arrives 0.05 s later and takes it over (``enqueue``'s ``_adopt``); at
    the connect's start plus the hedge delay (0.1 s), not before, it is
    presumed lost and cancelled, and the task's own connect (the network
    healed meanwhile) serves it: it does not wait out the lost connect's
    60 s timeout.

    Mutation killed: ``Leaser.acquire`` drains after ``enqueue`` looking at
    neither ``state.connect_failures`` nor ``state.connects_to_watch``:
    nothing armed the timer for the lost connect's deadline and the task
    was still waiting 5 s after it. (Either alone arms it: the upkeep
    runs only while connects fail, so without the session's
    ``connects_to_watch`` fix this hand-over was covered already.)"""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=1, clock=clock,
            server_settings={"application_name": app_name},
        )
        taker: asyncio.Future[Any] | None = None
        try:
            await refused_once(pool, proxy)
            proxy.blackhole = True
            pool.resize(min_size=1)
            floor_at = clock.now()
            await until_accepted(proxy, 1)  # the upkeep's connect (after its 1 s of loop time)
            assert connect_starts(pool) == [floor_at]
            assert pool.stats().waiting == 0
            proxy.blackhole = False  # (the black-holed connect stays unanswered)
            clock.advance(0.05)
            taker = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            lost_at = floor_at + HEDGE_AFTER
            step_to(clock, lost_at - EPS)
            await asyncio.sleep(0.05)  # (an absence: no second connect)
            assert connect_starts(pool) == [floor_at] and proxy.accepted == 1
            step_to(clock, lost_at)
            con = await asyncio.wait_for(taker, 5)
            assert await con.fetchval("SELECT 1") == 1
            assert proxy.accepted == 2 and pool.stats().size == 1
            await pool.release(con)
        finally:
            if taker is not None:
                taker.cancel()
            pool.terminate()


async def test_the_floor_upkeeps_connect_handed_to_a_task_waiting_in_a_backoff_is_hedged(
    running: Cluster, app_name: str
) -> None:
    """Paced (``wait_on_connect_error=True``), ``max_size=2``: a connect
    was refused; a task arrives during the backoff and waits with no
    connect of its own (none starts before the backoff ends), and the
    min_size upkeep (``min_size`` raised to 1) opens one into a black hole
    before that: ``plan_floor_connect`` hands it to the task (``_adopt``),
    and ``restore_floor`` starts it without draining. The task is not
    stranded on it: at the connect's start plus the hedge delay (0.1 s),
    not before, a hedge starts beside it (the network healed meanwhile),
    and its connection goes to the task, whose connect is presumed lost
    (``_grant_head_on_lost_connect``).

    Mutation killed: ``Leaser.acquire`` drains after ``enqueue`` without
    looking at ``state.connect_failures``: no timer was armed for the
    backoff's end, the upkeep's hand-over arms none either, and no hedge
    had started at 0.1 s (the task waited for the lost connect's 60 s)."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, clock=clock, wait_on_connect_error=True,
            server_settings={"application_name": app_name},
        )
        waiter: asyncio.Future[Any] | None = None
        try:
            await refused_once(pool, proxy)
            assert clock.now() < pool._state.backoff_until
            proxy.blackhole = True
            pool.resize(min_size=1)  # (before the task: resize() drains, and would arm the timer for it)
            floor_at = clock.now()
            waiter = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 1)
            assert pool.stats().connecting == 0  # (in the backoff: no connect of its own)
            await until_accepted(proxy, 1)  # the upkeep's connect (after its 1 s of loop time)
            [floor] = [slot for slot in pool._state.slots() if slot.state.value == "connecting"]
            assert floor.created_at == floor_at and floor.adopted and floor.owner is not None  # handed to the task
            proxy.blackhole = False  # (the black-holed connect stays unanswered)
            hedge_at = floor_at + HEDGE_AFTER
            assert hedge_at > pool._state.backoff_until
            step_to(clock, hedge_at - EPS)
            await asyncio.sleep(0.05)  # (an absence: no hedge yet)
            assert connect_starts(pool) == [floor_at] and proxy.accepted == 1
            assert not waiter.done()
            step_to(clock, hedge_at)
            assert connect_starts(pool) == [floor_at, hedge_at]
            con = await asyncio.wait_for(waiter, 5)
            assert await con.fetchval("SELECT 1") == 1
            assert proxy.accepted == 2
            await pool.release(con)
        finally:
            if waiter is not None:
                waiter.cancel()
            pool.terminate()


async def test_an_inline_reset_that_makes_a_capped_task_eligible_arms_the_orphans_lost_deadline(
    running: Cluster, app_name: str
) -> None:
    """``max_site_share=0.5`` of ``max_size=2`` (a cap of 1 per site): site
    ``a`` holds a connection that ran a statement, and a second task of
    ``a`` waits at its site's cap. A task of site ``b`` arrives in a black
    hole (its connect goes unanswered) and gives up: that connect is
    nobody's now, and no eligible task waits, so nothing watches it. Then
    ``a``'s lease is released: its reset is sent at once in the releasing
    task (the inline reset) and goes unanswered too (the black hole
    swallows it), and ``a``'s waiting task becomes eligible. With the
    connect under way for 0.1 s (the hedge delay) it is presumed lost now
    (``_lost_orphan_at``, docs/backpressure.md, "Connects that go
    unanswered"): it should be cancelled and the eligible task's own
    connect started (a resetting connection is no task's supply: it may
    never come back). Nothing happens: ``Leaser.release`` calls
    ``state.release`` and drains only if the core appended actions
    (``_leasing.py:507``), and making a site's tasks eligible appends none
    (``PoolState._policy_released`` without ``plan``), so the lost
    deadline ``next_deadline()`` now reports has no timer. The task waits
    for the reset (here until the reset watchdog's 30 s: the network
    healed, the swallowed reset never answers), where its own connect
    would have served it at once. (A reset that answers in a round trip
    serves the task before the deadline matters: the gap needs a slow or
    lost reset.)

    Found by a random walk of the state core with the runner's timer
    modelled beside it (tests/unit/test_review_s61_drain_model.py).
    Fixed: ``PoolState._policy_released`` sets ``connects_to_watch`` while
    connects run, and the release (inline reset, or ``after_hand_on``)
    drains for it."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, clock=clock, max_site_share=0.5,
            server_settings={"application_name": app_name},
        )
        tasks: list[asyncio.Future[Any]] = []
        try:
            held = await pool.acquire(site="a")
            assert await held.fetchval("SELECT 1") == 1  # (a statement: its release resets)
            start = clock.now()
            proxy.blackhole = True
            gave_up = asyncio.ensure_future(pool.acquire(site="b"))
            tasks.append(gave_up)
            await until_accepted(proxy, 2)
            gave_up.cancel()
            waiting = asyncio.ensure_future(pool.acquire(site="a"))
            tasks.append(waiting)
            await until(lambda: pool.stats().waiting == 1)
            lost_at = start + HEDGE_AFTER
            step_to(clock, lost_at + EPS)
            assert connect_starts(pool) == [start]  # (no eligible task waits: nobody needs it gone)
            release = asyncio.ensure_future(pool.release(held))  # (its reset goes into the black hole)
            tasks.append(release)
            await until(lambda: pool.stats().resetting == 1)
            proxy.blackhole = False
            assert pool._state.next_deadline() is not None and pool._state.next_deadline() <= clock.now()
            clock.advance(EPS)  # (a timer armed for the lost deadline fires)
            await until(lambda: proxy.accepted == 3, timeout=1)
            con = await asyncio.wait_for(waiting, 5)
            assert await con.fetchval("SELECT 1") == 1
        finally:
            for task in tasks:
                task.cancel()
            pool.terminate()
