"""Review h270: the bulkhead's timeout message names the busiest sites, not
the site of the task that timed out.

docs/backpressure.md (bulkheads): a second acquire of a site at its cap
"raises ``PoolTimeoutError`` naming the site (``site cap=1 (...: 1 in use,
0 waiting)``)", and the error table promises messages that "carry what an
operator needs". ``Reporter.busy_message`` (safepool/_reporting.py:171)
lists ``state.site_usage(3)``: the three busiest sites by in use +
waiting. The timed-out task has already left the queue when its message
is built, so its own site reads "1 in use, 0 waiting" and ranks below
every other capped site that still has a waiter: with four sites at a cap
of 1 and three of them queueing, the message names a, b and c and never
d, the site whose cap made this task wait. An operator reading it blames
the wrong routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import safepool
from safepool import ManualClock

pytestmark = pytest.mark.asyncio


async def _waiting(pool: safepool.Pool, n: int) -> None:
    for _ in range(1000):
        if pool.stats().waiting == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {n} waiting, got {pool.stats().waiting}")


async def test_a_timeout_at_a_site_cap_names_that_site(pools: Callable[..., Any]) -> None:
    clock = ManualClock()
    pool = await pools(min_size=4, max_size=4, max_site_share=0.25, clock=clock)  # cap 1 per site
    held = [await pool.acquire(site=name) for name in "abcd"]
    # Sites a, b and c each queue two tasks without a timeout (at their cap).
    patient = [asyncio.ensure_future(pool.acquire(site=name)) for name in "aabbcc"]
    await _waiting(pool, 6)
    # Site d's task waits at d's cap, for 1 s.
    timed = asyncio.ensure_future(pool.acquire(site="d", timeout=1.0))
    await _waiting(pool, 7)
    clock.advance(1.0)
    with pytest.raises(safepool.PoolTimeoutError) as caught:
        await timed
    message = str(caught.value)
    try:
        assert "site cap=1" in message, message
        assert "d: 1 in use" in message, message  # the site whose cap the task waited at
    finally:
        for con in held:
            await pool.release(con)
        for task in patient:
            await pool.release(await task)
