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

pytestmark = pytest.mark.asyncio


@pytest.mark.xfail(
    strict=True,
    reason="review h270: set_connect_args (pool.py:422) does not reset the breaker/backoff: "
    "acquires keep raising ServerUnavailableError citing the old arguments' error",
)
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
