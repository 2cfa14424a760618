"""A lost proxy's listener callbacks between the proxy's collection and the
reclaimer's first look (review h207's stand-in, found flaky on uvloop under
load, session s67). The collection schedules the reclaimer on the loop; a
notification, log message or termination read before it ran handed the
callback the connection itself (``con._proxy`` was a dead weak reference),
which a take-back cannot cut off. The stand-in is now made when the proxy is
collected. Deterministic: the callback is dispatched in the same loop step
as the collection, before the loop can run the reclaimer."""

from __future__ import annotations

import asyncio
import gc
import warnings
import weakref
from typing import Any

import pytest

import safepool
from tests._util import until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
async def test_a_callback_dispatched_before_the_reclaimer_runs_gets_the_stand_in(
    pools: Any, reset_mode: str
) -> None:
    if reset_mode == "auto":
        pytest.importorskip("pglast")
    pool = await pools(max_size=1, reset_mode=reset_mode)
    got: list[Any] = []
    done = asyncio.Event()

    async def on_notification(con: Any, pid: int, channel: str, payload: str) -> None:
        got.append((isinstance(con, safepool.PoolConnectionProxy), await con.fetchval("SELECT 7")))
        await con.remove_listener("stand_in_window", on_notification)
        done.set()

    async def lose_a_listening_lease() -> Any:
        con = await pool.acquire()  # safepool: ignore (lost under test)
        await con.add_listener("stand_in_window", on_notification)
        return weakref.ref(con._raw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        raw = await lose_a_listening_lease()
        gc.collect()
        # No await since the collection: the reclaimer has not run.
        raw()._process_notification(0, "stand_in_window", "")
        await asyncio.wait_for(done.wait(), 5)
        gc.collect()
        async with asyncio.timeout(10):
            await until(lambda: not pool.leases())  # reclaimed once the listener went
    assert got == [(True, 7)]
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT 1") == 1


async def test_the_reclaimer_keeps_the_stand_in_a_callback_got(pools: Any) -> None:
    """The stand-in made at the collection is the one the reclaimer keeps
    when it finds the connection still in use (a callback may hold it
    already): replaced, the held one would have been cut off from a lease
    that lasts."""
    pool = await pools(max_size=1)
    kept: list[Any] = []
    suspected = asyncio.Event()
    pool.add_listener(lambda event: suspected.set() if event["event"] == "leak_suspect" else None)

    def on_notification(con: Any, pid: int, channel: str, payload: str) -> None:
        kept.append(con)

    async def lose_a_listening_lease() -> Any:
        con = await pool.acquire()  # safepool: ignore (lost under test)
        await con.add_listener("stand_in_window", on_notification)
        return weakref.ref(con._raw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        raw = await lose_a_listening_lease()
        gc.collect()
        raw()._process_notification(0, "stand_in_window", "")
        await asyncio.wait_for(suspected.wait(), 5)  # the reclaimer's first look: still in use
        await until(lambda: kept != [])
        [stand_in] = kept
        assert raw()._proxy.proxy is stand_in
        await stand_in.remove_listener("stand_in_window", on_notification)
        assert await stand_in.fetchval("SELECT 2") == 2  # (the lease lasts: it works)
        kept.clear()
        del stand_in
        gc.collect()
        async with asyncio.timeout(10):
            await until(lambda: not pool.leases())
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT 1") == 1
