"""Review h263: a connection past ``max_queries`` that the pool takes back
(``lease_timeout``) or reclaims (its proxy garbage collected) is handed to
the next lease instead of being closed and replaced.

asyncpg's ``max_queries``: "number of queries after a connection is closed
and replaced with a new connection". safepool checks it only in
``Leaser.release`` (``safepool/_leasing.py:474``, ``USED_UP`` → DISCARD).
The take-back (``_reclaim.Reclaimer.take_back_slot``) and the reclaim
(``Reclaimer.reclaim``) reset the connection and call
``Runner.reset_done``, whose hand-on (``PoolState._hand_on``,
``safepool/_state.py:1330-1335``) closes a connection of an expired
generation (``expire_connections()`` and ``max_lifetime`` are honoured
there: the same scenario gets a new backend) but never looks at its
statement count: the next lease ran on a connection past its limit, and
was only closed at that lease's release. Fixed: ``Reclaimer.retire_if_used_up``
gives such a slot the retired generation, closed when its reset ends.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest

import safepool
from tests._util import until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.mark.parametrize(("max_queries", "replaced"), [(3, True), (50, False)], ids=["past", "under"])
async def test_take_back_closes_a_connection_past_max_queries(pools: Any, max_queries: int, replaced: bool) -> None:
    """Past max_queries the connection taken back is closed and replaced,
    as a release would; under it (the control) it is reset and handed on."""
    clock = safepool.ManualClock()
    pool = await pools(max_size=1, lease_timeout=10.0, clock=clock, max_queries=max_queries)
    con = await pool.acquire()  # safepool: ignore (taken back under test)
    pid = con.get_server_pid()
    for _ in range(5):
        await con.fetchval("SELECT 1")
    clock.advance(10.0)  # taken back
    async with pool.acquire(timeout=5) as other:
        assert (other.get_server_pid() != pid) is replaced
    assert pool.stats().resets_failed == 0


async def test_reclaim_closes_a_connection_past_max_queries(pools: Any) -> None:
    pool = await pools(max_size=1, max_queries=3)
    con = await pool.acquire()  # safepool: ignore (the leak under test)
    used_up = con.get_server_pid()
    for _ in range(5):
        await con.fetchval("SELECT 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del con
        gc.collect()
        await until(lambda: pool.stats().leaks_detected == 1)
    async with pool.acquire(timeout=5) as other:
        assert other.get_server_pid() != used_up
