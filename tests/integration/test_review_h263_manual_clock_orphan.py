"""Review h263: with ``clock=safepool.ManualClock()`` a lost proxy whose
query was still running when it was collected is never reclaimed, even
after the query ended, until the test advances the clock.

docs/leases.md: a collected lease is listed "until the pool reclaims it: on
the next turn of the event loop, or, while its connection is still in use (a
query running, ...), until that ends". docs/testing.md lists the timers a
``ManualClock`` drives (lease_timeout, leak_warning_after, acquire_timeout,
max_lifetime, max_inactive_connection_lifetime, the connect backoff) and the
ones on the loop's real clock; the reclaimer's re-check of a lost proxy's
connection is neither, yet ``Reclaimer.defer_reclaim`` arms it on the pool's
clock (``safepool/_reclaim.py:226``, ``self.clock.call_at(self.now() +
delay, ...)``, 0.05 s then doubling). Under a manual clock that time never
comes: the connection of ``await (await pool.acquire()).fetchval(...)``
(the incident's shape, SP003) stays leased for good, and with a small pool
the test's next acquire waits for ever (its timeout is on the manual clock
too). The default clock reclaims it at once (``leaks_detected`` 1).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import safepool
from tests._util import until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


async def _lose_a_proxy_mid_query(pool: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        # The proxy is garbage while its statement runs: the pool must wait, then reclaim.
        assert await (await pool.acquire()).fetchval("SELECT 1 FROM pg_sleep(0.05)") == 1  # safepool: ignore


async def test_default_clock_reclaims_once_the_query_ended(pools: Any) -> None:
    pool = await pools(max_size=1)
    await _lose_a_proxy_mid_query(pool)
    await until(lambda: pool.stats().leaks_detected == 1 and pool.stats().in_use == 0)


async def test_manual_clock_reclaims_once_the_query_ended(pools: Any) -> None:
    pool = await pools(max_size=1, clock=safepool.ManualClock())
    await _lose_a_proxy_mid_query(pool)
    await until(lambda: pool.stats().leaks_detected == 1 and pool.stats().in_use == 0, timeout=3.0)


async def test_manual_clock_reclaims_once_a_kept_object_is_dropped(pools: Any) -> None:
    """Another member of the kind: the lost proxy's connection stays in use
    while an object the program kept refers to it (a transaction never
    ended), and is reclaimed by a later re-check once that object is gone.
    That re-check too runs on the loop's time (it watches what the program
    does with the connection, not a timeout the test drives): no
    ``advance()`` is needed."""
    import gc

    pool = await pools(max_size=1, clock=safepool.ManualClock())
    kept: list[Any] = []

    async def lose_keeping_a_transaction() -> None:
        con = await pool.acquire()  # safepool: ignore (lost under test)
        tr = con.transaction()
        await tr.start()  # never ended
        kept.append(tr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await lose_keeping_a_transaction()
        gc.collect()
        await until(lambda: pool._runner.slot_holders and any(
            h.orphan_checks >= 2 for h in pool._runner.slot_holders.values()))  # (re-checked: still in use)
        assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
        kept.clear()
        gc.collect()
        await until(lambda: pool.stats().leaks_detected == 1 and pool.stats().in_use == 0, timeout=5.0)
    async with pool.acquire(timeout=5.0) as con:
        assert not con.is_in_transaction()
