"""Review of abandoned-connection reclamation and its leak reports: what the
reports say about a lost proxy (the task, the time it was collected)."""

from __future__ import annotations

import asyncio
import gc
import re
import warnings
from typing import Any

import pytest

import safepool
from safepool import ManualClock
from tests._util import until

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("runner", ["gather", "ensure_future", "shield"])
async def test_a_leak_report_names_the_task_that_called_acquire(pools: Any, runner: str) -> None:
    pool = await pools(min_size=1, max_size=1, capture_stack=True)
    leaked: list[Any] = []
    pool.add_event_listener(lambda event: leaked.append(event) if isinstance(event, safepool.events.Leaked) else None)

    async def handler() -> None:
        if runner == "gather":
            [con] = await asyncio.gather(pool.acquire())
        elif runner == "ensure_future":
            con = await asyncio.ensure_future(pool.acquire())
        else:
            con = await asyncio.shield(pool.acquire())
        # (Held in the task, and then lost without a release.)
        [info] = pool.leases()
        assert info.acquired_at is not None and info.acquired_at.endswith("in handler")
        del con

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.create_task(handler(), name="orders-handler")
        gc.collect()
        await until(lambda: bool(leaked))
    [event] = leaked
    # The site is the handler's (the stack is taken at pool.acquire()); the
    # task must be the one that called it, which is the task alive to look at.
    assert event.lease.task_name == "orders-handler", event.lease.task_name


async def test_a_deferred_reclaim_report_does_not_misdate_the_collection(pg_dsn: str) -> None:
    clock = ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, clock=clock)
    try:
        con = await pool.acquire()
        statement = await con.prepare("SELECT 1")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del con
            gc.collect()  # collected at once, 0 s after the acquire on this clock
            await until(lambda: any(info.collected for info in pool.leases()))
            for _ in range(20):  # the statement keeps the connection in use for 60 s
                clock.advance(3.0)
                await asyncio.sleep(0)
            assert await statement.fetchval() == 1
            del statement
            clock.advance(3.0)
            await until(lambda: pool.stats().leaks_detected == 1)
            reports = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        [report] = [r for r in reports if "garbage collected" in r]
        # The proxy was garbage collected 0 s after the acquire; the report
        # may give the time held (60 s), but not as the collection's time.
        stated = re.search(r"garbage collected without being released, ([0-9.]+)s after its acquire", report)
        assert stated is None or float(stated.group(1)) < 1.0, report
    finally:
        pool.terminate()
