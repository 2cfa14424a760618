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
CHANNEL = "stand_in_window"


async def _lose_a_listening_lease_and_notify(pool: safepool.Pool, callback: Any) -> Any:
    """Lease a connection, listen on it, lose its proxy (garbage collected),
    then dispatch a notification in the same loop step: no await since the
    collection, so the reclaimer has not run. Returns a weak reference to
    the connection."""

    async def lose() -> Any:
        con = await pool.acquire()  # safepool: ignore (lost under test)
        await con.add_listener(CHANNEL, callback)
        return weakref.ref(con._raw)

    raw = await lose()
    gc.collect()
    raw()._process_notification(0, CHANNEL, "")
    return raw


async def _reclaimed_and_usable(pool: safepool.Pool) -> None:
    gc.collect()
    async with asyncio.timeout(10):
        await until(lambda: not pool.leases())  # reclaimed once nothing refers to it
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT 1") == 1


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
        await con.remove_listener(CHANNEL, on_notification)
        done.set()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await _lose_a_listening_lease_and_notify(pool, on_notification)
        await asyncio.wait_for(done.wait(), 5)
        assert got == [(True, 7)]
        await _reclaimed_and_usable(pool)


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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        raw = await _lose_a_listening_lease_and_notify(pool, on_notification)
        await asyncio.wait_for(suspected.wait(), 5)  # the reclaimer's first look: still in use
        await until(lambda: kept != [])
        [stand_in] = kept
        assert raw()._proxy.proxy is stand_in
        await stand_in.remove_listener(CHANNEL, on_notification)
        assert await stand_in.fetchval("SELECT 2") == 2  # (the lease lasts: it works)
        kept.clear()
        del stand_in
        await _reclaimed_and_usable(pool)
