"""Review h249: a cancel request that never gets through (new connections to
the server's address accepted and never relayed) while an expired lease is
released mid-statement, the statement then ending by itself (0.3 s).

Both pools hold the release for its whole budget (``timeout=1``) and raise
``TimeoutError``: asyncpg's ``close(timeout=)`` waits for its cancel
request; safepool's close, once the statement ended, still awaits its last
request (``_workers._once_free``'s ``finally``; for a close, where only
Terminate follows, that request could be dropped), then aborts. The
statement's own result reaches its caller on safepool's pool; on asyncpg's
it fails with ``InternalClientError`` ("got result for unknown protocol
state 3", review h245)."""

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


@pytest.mark.parametrize("create_pool", [asyncpg.create_pool, safepool.create_pool], ids=["asyncpg", "safepool"])
async def test_stalled_cancel_request_holds_the_release_for_its_budget(
    running: Cluster, app_name: str, create_pool: Any
) -> None:
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
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.release(con, timeout=1), 10)
            took = time.monotonic() - started
            try:
                outcome = await asyncio.wait_for(call, 10)
            except Exception as error:  # noqa: BLE001
                outcome = error
            assert proxy.stalled.is_set()
        finally:
            pool.terminate()
    assert 0.9 < took < 1.6, took
    if create_pool is safepool.create_pool:
        assert outcome == "done", outcome
    else:
        # (The statement's answer in the protocol's CANCELLED state: review h245's error.)
        assert isinstance(outcome, asyncpg.InternalClientError), outcome
