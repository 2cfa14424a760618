"""Review s59: safepool inside a real ASGI service (the FastAPI recipe of
docs/recipes.md), under client disconnects, leaking handlers, terminated
backends, server restarts, on asyncio and uvloop.

Each test here reproduces a bug that review found, fixed since: the
readiness probe reported the pool failing when it landed on an idle
connection whose backend had just been terminated. The app runs in-process
through httpx's ASGI transport (its lifespan entered on the test's loop),
against the session's embedded PostgreSQL; the siblings call
``pool.health()`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

import safepool

from .test_recipes import load

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def recipe_app(pg_dsn: str, app_name: str, **overrides: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    recipe = load("fastapi")
    overrides.setdefault("server_settings", {"application_name": app_name})
    app = recipe.create_app(pg_dsn, **overrides)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def terminate_backends_while_the_loop_is_busy(pg_dsn: str, app_name: str) -> int:
    """pg_terminate_backend() of every backend of ``app_name``, run on a loop
    of its own in another thread while the caller's loop waits (blocked in
    join()): the app's loop has not read the backends' FATAL and EOF yet when
    its next request runs, as happens to a request that lands right after a
    DBA's kill, a PgBouncer restart or a server's idle_session_timeout."""
    killed: list[int] = []

    async def kill() -> None:
        admin = await asyncpg.connect(pg_dsn)
        try:
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name
            )
            killed.append(len(rows))
            for _ in range(500):  # until the server has let them go
                if not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
                ):
                    return
                await asyncio.sleep(0.01)
        finally:
            await admin.close()

    thread = threading.Thread(target=asyncio.run, args=(kill(),))
    thread.start()
    thread.join()
    return killed[0]


async def test_readiness_stays_ready_when_an_idle_backend_was_just_terminated(pg_dsn: str, app_name: str) -> None:
    """docs/metrics.md: failing means "the pool cannot serve queries now",
    and the load balancer takes the instance out. The probe landed on an
    idle connection whose backend was gone (the loop had not read its EOF)
    and answered 503 while the next request was served."""
    async with recipe_app(pg_dsn, app_name, min_size=2, max_size=2) as (app, client):
        pool = app.state.pool
        assert pool.stats().idle == 2
        assert terminate_backends_while_the_loop_is_busy(pg_dsn, app_name) == 2
        ready = await client.get("/ready")
        for _ in range(100):  # the loop reads the other backend's EOF: nothing idle is dead
            if pool.stats().connections_closed >= 2:
                break
            await asyncio.sleep(0.01)
        assert pool.stats().connections_closed >= 2
        served = await client.get("/numbers/1")
        assert served.status_code == 200, served.text  # the pool serves: the server is up
        assert ready.status_code == 200, ready.json()


@pytest.mark.parametrize("idle", [1, 3])
async def test_the_probe_tries_every_idle_connection_lost_before_it_reports(
    pg_dsn: str, app_name: str, idle: int,
) -> None:
    """The sibling without the web app: every idle connection's backend is
    terminated before the loop reads it; the probe's first query fails on
    the first dead connection, and the report is ok (with the probe's
    latency), the dead connections let go and the pool whole."""
    pool = await safepool.create_pool(
        pg_dsn, min_size=idle, max_size=idle, server_settings={"application_name": app_name}
    )
    try:
        assert pool.stats().idle == idle
        assert terminate_backends_while_the_loop_is_busy(pg_dsn, app_name) == idle
        report = await pool.health(probe_timeout=5)
        assert report.status == "ok", report.to_dict()
        assert report.probe_latency is not None
        assert await pool.fetchval("SELECT 1") == 1
        stats = pool.stats()
        assert stats.in_use == 0 and stats.connections_closed >= 1
        pool._state.check_invariants()
    finally:
        await pool.close()


async def test_a_probe_query_that_kills_its_own_backend_still_reports_failing(pg_dsn: str) -> None:
    """The retry is bounded: a probe whose every connection dies under its
    query (here it terminates its own backend) is tried once per connection
    the pool could hand it (max_size + 1 attempts), then reported
    failing, within probe_timeout, and the pool is left whole."""
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=2)
    try:
        report = await pool.health(
            probe_timeout=10, probe_query="SELECT pg_terminate_backend(pg_backend_pid())"
        )
        assert report.status == "failing"
        assert [reason.code for reason in report.reasons][:1] == ["probe_failed"], report.to_dict()
        stats = pool.stats()
        assert stats.acquired == 3, stats  # max_size + 1 attempts, no more
        assert stats.in_use == 0
        pool._state.check_invariants()
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
