"""Review of the adaptive queue with site caps on a real PostgreSQL
(docs/backpressure.md, "Adaptive queue": a capped site's waiter "neither
makes it stand ... nor is shed or refused by deadline-aware admission;
each waits up to its own timeout"). Time is a ManualClock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import safepool
from safepool import ManualClock
from tests.integration.test_overload_review import _queued

pytestmark = pytest.mark.asyncio


async def test_one_site_pool_serves_a_waiter_when_the_lease_ends(pools: Callable[..., Any]) -> None:
    """max_size=1, max_site_share=0.5 (cap 1), queue_policy="adaptive": a
    program whose acquires are all one site. Task 2 waits (timeout 5 s)
    while task 1 holds the connection for 1 s; nobody else waits, so the
    queue of sites under their cap is empty. When the lease ends task 2
    must get the connection. It got PoolOverloadedError ("the wait queue
    has not been empty for 1.000s") and the connection went idle."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, max_site_share=0.5, queue_policy="adaptive", clock=clock)
    con = await pool.acquire(site="a")
    task = asyncio.ensure_future(pool.acquire(site="a", timeout=5.0))
    await _queued(pool, 1)
    clock.advance(1.0)  # a one-second lease
    await pool.release(con)
    try:
        second = await task
    except safepool.PoolOverloadedError as exc:
        stats = pool.stats()
        raise AssertionError(f"shed: {exc} (idle={stats.idle}, shed={stats.shed})") from None
    assert await second.fetchval("SELECT 1") == 1
    await pool.release(second)
    assert pool.stats().shed == 0
