"""Adversarial review of the overload features (docs/backpressure.md) on a
real PostgreSQL: bulkheads with max_waiters, the adaptive queue's sheds,
cancellation at the moment of a refusal. Time is a ManualClock wherever
the pool's deadlines decide the outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _queued(pool: safepool.Pool, waiting: int) -> None:
    """Let the loop run until ``waiting`` tasks wait (no sleeps: loop passes)."""
    for _ in range(1000):
        if pool.stats().waiting == waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {waiting} waiting, got {pool.stats().waiting}")


async def test_capped_site_takes_at_most_its_share_of_max_waiters(pools: Callable[..., Any]) -> None:
    """docs/backpressure.md: "With max_waiters, a site may also take at most
    its share of the queue (ceil(s * max_waiters) waiting tasks), so a capped
    site cannot fill the queue for everyone else", and tasks the pool opens a
    connection for do not count. A site at its cap gets no connection opened
    for it: its waiters are all queued behind busy connections, so the room
    under max_size is not theirs. Before the fix, site "hog" (cap 2, share of
    the queue 1) queued 3 tasks on the room left for others, and site "other"
    was refused a second task although the pool could still open a
    connection for it."""
    pool = await pools(min_size=2, max_size=4, max_site_share=0.5, max_waiters=2)
    held = [await pool.acquire(site="hog") for _ in range(2)]
    tasks = []
    refused = 0
    for _ in range(3):
        task = asyncio.ensure_future(pool.acquire(site="hog"))
        await asyncio.sleep(0)
        if task.done():
            with pytest.raises(safepool.PoolOverloadedError):
                task.result()
            refused += 1
        else:
            tasks.append(task)
    sites = {s.site: s.waiting for s in pool.stats().sites}
    assert sites.get("hog") == 1 and refused == 2, (sites, refused)
    # The other site: two tasks, each one the pool can open a connection for.
    others = [await pool.acquire(site="other") for _ in range(2)]
    assert pool.stats().overload_rejections == 2
    for con in others + held:
        await pool.release(con)
    for task in tasks:
        await pool.release(await task)
    pool._state.check_invariants()

