"""Review s62 (mutation review of safepool/_policy.py): deadline-aware
admission of the adaptive queue measures a quiet spell as a gap between
hand-ons, on a real PostgreSQL. docs/backpressure.md, "Deadline-aware
admission": the drain rate is "an EWMA of the time between connections
handed to waiters, measured only while tasks wait; ... a quiet spell with
nobody waiting is no stall". Time is a ManualClock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import safepool
from safepool import ManualClock
from tests._util import until
from tests.integration.test_overload_review import _queued

pytestmark = pytest.mark.asyncio


async def test_a_quiet_spell_does_not_make_admission_refuse_a_task_with_nobody_ahead(
    pools: Callable[..., Any],
) -> None:
    """max_size=1, queue_policy="adaptive" (queue_target=1 s,
    queue_interval=10 s). Ten tasks are served 0.1 s apart while others
    wait (10 connections/s measured); the pool then sits unused for 100 s;
    one task waits 0.1 s for the connection. A task with a 5 s timeout
    then waits behind the one lease with nobody ahead: served in ~0.1 s at
    the measured rate, it must be admitted and served. It got
    PoolOverloadedError at once ("0 task(s) ahead, the pool hands on 0
    connections/s"): the 100 s without anybody waiting entered the
    average (gap ~10 s), and with every timed task refused no more gaps
    are measured, so it stayed that way. Fixed: a gap runs from the later
    of the last hand-on and the last moment nobody waited."""
    clock = ManualClock()
    pool = await pools(
        min_size=1, max_size=1, queue_policy="adaptive", queue_target=1.0, queue_interval=10.0, clock=clock
    )
    con = await pool.acquire()
    tasks = [asyncio.ensure_future(pool.acquire()) for _ in range(10)]
    await _queued(pool, 10)
    for task in tasks:
        clock.advance(0.1)
        await pool.release(con)
        con = await task
    clock.advance(0.1)
    await pool.release(con)  # nobody waits: the connection idles
    clock.advance(100.0)  # a quiet spell
    con = await pool.acquire()
    brief = asyncio.ensure_future(pool.acquire())
    await _queued(pool, 1)
    clock.advance(0.1)
    await pool.release(con)
    con = await brief
    clock.advance(0.1)
    waiter = asyncio.ensure_future(pool.acquire(timeout=5.0))
    await until(lambda: waiter.done() or pool.stats().waiting == 1)
    if waiter.done():
        exc = waiter.exception()
        assert not isinstance(exc, safepool.PoolOverloadedError), f"refused: {exc}"
    await pool.release(con)
    second = await waiter
    assert await second.fetchval("SELECT 1") == 1
    await pool.release(second)
    assert pool.stats().admission_rejections == 0
