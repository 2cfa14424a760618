"""The ``pool_closed`` event (``safepool.events.PoolClosed``): sent once
when a pool closes, however it closes, with its last stats (review h271:
what the OpenTelemetry instruments continue a re-created pool's counters
from)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

import safepool
from safepool.events import PoolClosed

pytestmark = pytest.mark.asyncio


async def _listened(pools: Any) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    pool = await pools(min_size=1, max_size=2)
    typed: list[Any] = []
    dicts: list[dict[str, Any]] = []
    pool.add_event_listener(typed.append)
    pool.add_listener(dicts.append)
    for _ in range(3):
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
    return pool, typed, dicts


def _closed(events: list[Any]) -> list[PoolClosed]:
    return [event for event in events if isinstance(event, PoolClosed)]


@pytest.mark.parametrize("how", ["close", "terminate", "close then terminate", "terminate then close"])
async def test_sent_once_with_the_last_stats(pools: Any, how: str) -> None:
    pool, typed, dicts = await _listened(pools)
    for step in how.split(" then "):
        if step == "close":
            await pool.close()
        else:
            pool.terminate()
    (event,) = _closed(typed)
    assert event.pool == pool.name and event.kind == "pool_closed"
    assert event.stats.acquired == event.stats.released == 3
    assert event.stats == dataclasses.replace(pool.stats(), taken_at=event.stats.taken_at)  # (nothing moved since)
    assert [d for d in dicts if d["event"] == "pool_closed"] == []  # (a new kind: typed listeners only)


async def test_a_close_cut_short_sends_it_once(pools: Any) -> None:
    pool, typed, _ = await _listened(pools)
    held = await pool.acquire()  # safepool: ignore (ended by the close cut short)
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    (event,) = _closed(typed)
    assert event.stats.acquired == 4 and event.stats.leases_discarded == 1
    with pytest.raises(safepool.PoolInterfaceError):
        await held.fetchval("SELECT 1")  # (its lease ended with the pool)
