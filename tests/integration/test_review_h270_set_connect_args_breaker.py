"""Review h270: ``set_connect_args()`` keeps the breaker open on the old
arguments' failures.

With ``fail_fast=True`` a pool whose connects keep failing opens its
circuit: acquires raise ``ServerUnavailableError`` "until the next probe is
due", up to ``Backoff.cap`` (2 s) after errors such as a missing database
or a wrong password. The operator fixes the arguments with
``pool.set_connect_args()`` (the documented way, asyncpg's too). Expected:
the next acquire connects with the new arguments (asyncpg's pool does, at
once). Found: ``Pool.set_connect_args`` (safepool/pool.py:422) only swaps
the arguments; the core keeps ``server_failures``, ``backoff_until`` and
``last_connect_error`` (safepool/_state.py ``enqueue``, the breaker test),
so every acquire until the old backoff ends is refused with
``ServerUnavailableError`` whose message and ``__cause__`` quote the old
arguments' error ("database ... does not exist"), which no longer applies.
(Time is a ManualClock: the refusal lasts until ``advance()``; on the real
clock it lasts up to 2 s, longer with a larger ``Backoff.cap``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from tests._util import until

pytestmark = pytest.mark.asyncio


async def test_fixed_connect_args_are_tried_at_the_next_acquire(
    pools: Callable[..., Any], pg_dsn: str, app_name: str
) -> None:
    clock = ManualClock()
    parts = urlsplit(pg_dsn)
    wrong = urlunsplit(parts._replace(path="/no_such_db_h270"))
    pool = await pools(
        dsn=wrong, min_size=0, max_size=1, fail_fast=True, clock=clock,
        backoff=safepool.Backoff(rng=lambda: 0.0),
    )
    # Three connects fail in a row (a probe each, the clock moved past each
    # backoff): the third opens the circuit.
    for attempt in range(3):
        if attempt:
            clock.advance(2.0)  # past the backoff: the next acquire probes
        with pytest.raises((asyncpg.InvalidCatalogNameError, safepool.ServerUnavailableError)):
            await asyncio.wait_for(pool.acquire(), 10)
    # Circuit open: an acquire now is refused at once.
    with pytest.raises(safepool.ServerUnavailableError, match="no_such_db_h270"):
        await asyncio.wait_for(pool.acquire(), 10)
    # The operator fixes the database name.
    pool.set_connect_args(pg_dsn, server_settings={"application_name": app_name})
    try:
        con = await asyncio.wait_for(pool.acquire(), 10)
    except safepool.ServerUnavailableError as error:
        raise AssertionError(f"refused after the fix: {error}") from error
    assert await con.fetchval("SELECT 1") == 1
    await pool.release(con)


async def test_a_waiter_backing_off_connects_with_the_fixed_args_at_once(
    pools: Callable[..., Any], pg_dsn: str, app_name: str
) -> None:
    """The sibling under ``wait_on_connect_error``: a task waits while the
    wrong arguments' connects back off (the clock never moves); fixing them
    connects for it now."""
    clock = ManualClock()
    pool = await pools(
        min_size=1, max_size=2, wait_on_connect_error=True, clock=clock,
        backoff=safepool.Backoff(rng=lambda: 0.0),
    )
    held = await pool.acquire()
    parts = urlsplit(pg_dsn)
    pool.set_connect_args(urlunsplit(parts._replace(path="/no_such_db_h270")))
    waiter = asyncio.ensure_future(pool.acquire())
    await until(lambda: pool.stats().connect_errors >= 1)  # (the waiter waits on, backing off)
    assert not waiter.done()
    pool.set_connect_args(pg_dsn, server_settings={"application_name": app_name})
    con = await asyncio.wait_for(waiter, 10)
    try:
        assert await con.fetchval("SELECT current_setting('application_name')") == app_name
    finally:
        await pool.release(con)
        await pool.release(held)


async def test_set_connect_args_on_a_pool_not_started_or_closed(pools: Callable[..., Any], pg_dsn: str) -> None:
    pool = safepool.create_pool(pg_dsn, min_size=0, max_size=1)
    pool.set_connect_args(pg_dsn)  # (not awaited yet: nothing to plan)
    await pool
    assert await pool.fetchval("SELECT 1") == 1
    await pool.close()
    pool.set_connect_args(pg_dsn)  # (closed: nothing to plan, no error, as asyncpg's)
    assert pool.get_size() == 0
