"""Review h249: a cancel request that never gets through (new connections
to the server's address accepted and never relayed) while an expired lease is
released mid-statement, the statement then ending by itself (0.3 s).

safepool's close waits for the statement to end (``_workers.statement_ended``)
and then closes: the request still under way is dropped, since only the
close's Terminate follows it (``_once_free(probe=True)``). Before, the close
awaited that request for the release's whole budget (``timeout=1``), then
aborted and raised ``TimeoutError``; on asyncpg 0.29-0.31, where a close
keeps the pool's own bound (``_internals.CLOSE_UNDER_BUDGET``), for 10 s.
The statement's own result reaches its caller.

asyncpg 0.32's pool holds the release for its budget and raises
``TimeoutError`` (``close(timeout=)`` waits for its cancel request); the
statement fails with ``InternalClientError`` ("got result for unknown
protocol state 3", review h245). asyncpg 0.29-0.31's ``close()`` awaits its
cancel request outside the timeout: the release does not end at all."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until_in_pg_sleep

from ._pg import Cluster
from .test_review_s75_close_meets_call import StallingProxy

pytestmark = [pytest.mark.asyncio]


APG_032 = tuple(int(p) for p in asyncpg.__version__.split(".")[:2]) >= (0, 32)


@pytest.mark.parametrize("create_pool", [asyncpg.create_pool, safepool.create_pool], ids=["asyncpg", "safepool"])
async def test_stalled_cancel_request_and_a_release_budget(running: Cluster, app_name: str, create_pool: Any) -> None:
    async with StallingProxy(running.port) as proxy:
        pool = await create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, server_settings={"application_name": app_name}
        )
        try:
            con = await pool.acquire()
            call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
            await until_in_pg_sleep(running.admin_dsn, con.get_server_pid())
            proxy.stall = True
            await pool.expire_connections()
            started = time.monotonic()
            released: BaseException | None = None
            try:
                await asyncio.wait_for(pool.release(con, timeout=1), 3)
            except TimeoutError as error:
                released = error
            took = time.monotonic() - started
            try:
                outcome = await asyncio.wait_for(call, 10)
            except Exception as error:  # noqa: BLE001
                outcome = error
            assert proxy.stalled.is_set()
        finally:
            pool.terminate()
    if create_pool is safepool.create_pool:
        assert released is None
        assert took < 0.8, took  # (the statement's remaining 0.3 s, not the budget)
        assert outcome == "done", outcome
        return
    assert isinstance(released, TimeoutError)
    if APG_032:
        assert 0.9 < took < 1.6, took
        # (The statement's answer in the protocol's CANCELLED state: review h245's error.)
        assert isinstance(outcome, asyncpg.InternalClientError), outcome
    else:
        assert took > 2.9, took  # (the outer bound: asyncpg's close awaits its request unbounded)
