"""Review s61 of the session's timer fixes (helper-186), the connect side:
what needs the fault proxy's black hole (a connect that never answers).

``PoolState.connects_to_watch`` asks an acquire to drain (arming the pool's
timer) when ``enqueue`` finds the new waiter depending on a connect under
way: one it took over, or with a queue policy an orphan (a connect whose
trigger no longer waits). These tests look at the other ways a waiter
comes to depend on such a connect.
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


@pytest.mark.parametrize("options", [{"max_site_share": 1.0}, {"queue_policy": "adaptive"}], ids=["max_site_share", "adaptive"])
async def test_a_connect_orphaned_by_a_release_is_presumed_lost_at_its_hedge_delay(
    running: Cluster, app_name: str, options: dict[str, Any]
) -> None:
    """With a queue policy, ``max_size=2``: a lease holds connection A; the
    network turns into a black hole for new connections; task 1 queues and
    its connect C goes unanswered; task 2 queues behind it (no ``timeout=``,
    asyncpg's default; the pool is full, C counts as task 1's supply). A
    is released: the policy hands it to task 1 (FIFO), so C's trigger no
    longer waits and C is task 2's supply: an orphan, which
    ``_abandon_orphans`` presumes lost 0.1 s after it started
    (``_lost_orphan_at``), and task 2 gets a connect of its own, which the
    healed network answers.

    Had task 2 queued after the release, ``enqueue`` would have set
    ``connects_to_watch`` and its acquire drained (armed the timer). Here
    the orphan appears in the release: ``Leaser.release`` ->
    ``Runner.after_hand_on``, whose hot path (one ``Wake``, nothing
    pending) returned without ``drain()``/``arm_timer()``; nothing else was
    armed, so C was never presumed lost and task 2 waited out C's own
    connect timeout: on the loop's clock it was served 60.06 s after it
    queued, where a task that queued after the release was served in 0.10
    s. Found by this review; fixed: a grant while connects run sets
    ``connects_to_watch`` too (``PoolState._grant``), and the hot path
    drains when it is set."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, clock=clock,
            server_settings={"application_name": app_name}, **options,
        )
        first = second = None
        try:
            held = await pool.acquire()  # A (runs no statement: its release sends nothing)
            proxy.blackhole = True
            start = clock.now()
            first = asyncio.ensure_future(pool.acquire())
            await until_accepted(proxy, 2)
            assert connect_starts(pool) == [start]
            proxy.blackhole = False  # (C stays swallowed: its proxy handler never connects upstream)
            clock.advance(0.02)
            second = asyncio.ensure_future(pool.acquire())
            await until(lambda: pool.stats().waiting == 2)
            assert connect_starts(pool) == [start]
            connection_a = held._con
            await pool.release(held)
            got = await asyncio.wait_for(first, 5)
            assert got._con is connection_a  # A went to task 1, C's trigger
            assert pool.stats().waiting == 1 and not second.done()
            lost_at = start + HEDGE_AFTER
            step_to(clock, lost_at - EPS)
            assert connect_starts(pool) == [start]
            step_to(clock, lost_at)
            assert connect_starts(pool) != [start], "the orphaned connect was not presumed lost at its hedge delay"
            await asyncio.wait_for(second, 5)  # served by its own connect, which the healed network answers
        finally:
            for task in (first, second):
                if task is not None:
                    task.cancel()
            pool.terminate()
