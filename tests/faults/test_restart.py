"""The server is stopped and started again under load."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import safepool

from ._harness import Ledger, ServerSampler, assert_books_balance, closing, loop_errors, scale
from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

MAX_SIZE = 5
WORKERS = 20


async def _load(pool: safepool.Pool, ledger: Ledger, successes: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with pool.acquire() as con:
                await con.fetchval("SELECT pg_sleep(0.002)")
            ledger.ok += 1
            successes.append(time.monotonic())
        except Exception as exc:
            ledger.record(exc)
            await asyncio.sleep(0.01)  # a real client would back off too


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_under_load(running: Cluster, app_name: str, mode: str, report: Any) -> None:
    """Stop the server (a clean shutdown, or a crash: ``immediate``), keep it
    down, start it again: the pool serves again within seconds, and never
    leaks or double-counts a connection."""
    downtime = scale(1.5, 5.0)
    pool = await safepool.create_pool(
        running.dsn(),
        min_size=2,
        max_size=MAX_SIZE,
        acquire_timeout=2.0,
        server_settings={"application_name": app_name},
    )
    ledger = Ledger()
    successes: list[float] = []
    stop = asyncio.Event()
    async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
        with loop_errors() as unhandled:
            workers = [asyncio.create_task(_load(pool, ledger, successes, stop)) for _ in range(WORKERS)]
            await asyncio.sleep(1.0)
            before = ledger.ok
            assert before > 0
            await asyncio.to_thread(running.stop, mode)
            stopped_at = time.monotonic()
            await asyncio.sleep(downtime)
            await asyncio.to_thread(running.start)  # returns once the server accepts connections
            accepting_at = time.monotonic()
            async with asyncio.timeout(10):
                while not successes or successes[-1] < accepting_at:
                    await asyncio.sleep(0.005)
            recovered_at = min(t for t in successes if t >= accepting_at)
            await asyncio.sleep(1.0)  # keep the load on after recovery
            stop.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*workers)
            await assert_books_balance(pool, sampler)
        assert not unhandled, unhandled
    ledger.check()
    recovery = recovered_at - accepting_at
    served_during_outage = sum(1 for t in successes if stopped_at < t < accepting_at)
    report(
        mode=mode,
        downtime_s=round(downtime, 2),
        recovery_s=round(recovery, 3),
        max_server_connections=sampler.max_seen,
        samples=len(sampler.samples),
        served_during_outage=served_during_outage,
        ledger=ledger.summary(),
        connect_errors=pool.stats().connect_errors,
    )
    assert recovery < 5.0, f"recovered {recovery:.2f}s after the server accepted again"
    assert sampler.max_seen <= MAX_SIZE, sampler.samples
    assert len(sampler.samples) > 20
