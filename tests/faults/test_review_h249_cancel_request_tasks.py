"""Review h249: ``_workers._once_free`` runs its cancel requests in tasks of
their own (s75). A request that never gets through (new connections to the
server's address stalled) while the pool's close waits for a statement of
an expired lease: however the wait ends (``pool.terminate()``, the
releasing task cancelled or timed out from outside, the release's budget,
``Pool.close()``), no task of the pool's is left pending, nothing reaches
the loop's exception handler, and no socket is left for the garbage
collector (ResourceWarning)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest

import safepool
from tests._util import until_in_pg_sleep

from ._pg import Cluster
from .test_review_s75_close_meets_call import StallingProxy

pytestmark = [pytest.mark.asyncio]


def _pool_tasks() -> list[asyncio.Task[Any]]:
    names = ("_cancel_request", "_once_free", "statement_ended", "close_connection", "cancel_running_query")
    return [
        t for t in asyncio.all_tasks()
        if not t.done() and any(n in repr(t.get_coro()) for n in names)
    ]


@pytest.mark.parametrize("end", ["terminate", "outer_cancel", "outer_timeout", "budget", "pool_close"])
async def test_no_task_left_behind(running: Cluster, app_name: str, end: str) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with StallingProxy(running.port) as proxy:
                pool = await safepool.create_pool(
                    running.dsn(port=proxy.port), min_size=0, max_size=2,
                    server_settings={"application_name": app_name},
                )
                try:
                    con = await pool.acquire()
                    call = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(1)"))
                    await until_in_pg_sleep(running.admin_dsn, con.get_server_pid())
                    proxy.stall = True
                    await pool.expire_connections()
                    release = asyncio.ensure_future(pool.release(con, timeout=0.5 if end == "budget" else None))
                    await asyncio.wait_for(proxy.stalled.wait(), 10)  # a cancel request under way
                    await asyncio.sleep(0.01)
                    assert any("_cancel_request" in repr(t.get_coro()) for t in _pool_tasks())
                    if end == "terminate":
                        pool.terminate()
                    elif end == "outer_cancel":
                        release.cancel()
                    elif end == "outer_timeout":
                        with pytest.raises(TimeoutError):
                            async with asyncio.timeout(0.05):
                                await asyncio.shield(release)
                        release.cancel()
                    elif end == "pool_close":
                        await asyncio.wait({release}, timeout=0.05)
                        closing = asyncio.ensure_future(pool.close())
                        await asyncio.sleep(0.05)
                        pool.terminate()
                        await asyncio.wait({closing}, timeout=5)
                    await asyncio.wait({release}, timeout=5)
                    await asyncio.wait({call}, timeout=5)
                    if end in ("outer_cancel", "outer_timeout"):
                        pool.terminate()
                finally:
                    pool.terminate()
                for _ in range(20):
                    await asyncio.sleep(0.01)
                left = _pool_tasks()
                for task in (release, call):
                    if task.done() and not task.cancelled():
                        task.exception()
            gc.collect()
            for _ in range(5):
                await asyncio.sleep(0)
        assert left == [], left
        assert reported == [], reported
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    finally:
        loop.set_exception_handler(None)
