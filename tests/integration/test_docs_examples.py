"""The code shown in docs/getting-started.md, docs/best-practices.md, docs/testing.md and
docs/runbook.md (included from docs/examples/) runs, on a real PostgreSQL,
and leaks nothing."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest
import pytest_asyncio

import safepool
from safepool.testing import assert_no_leaks
from tests._util import stuck_in_a_query

pytestmark = pytest.mark.asyncio
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bp = load("best_practices")
testing_clock = load("testing_clock")
HOLDER_LINE = next(n for n, text in enumerate(Path(__file__).read_text().splitlines(), 1) if text.endswith("# HOLDER"))


def _doc(page: str) -> str:
    """The text of a docs/ page (read synchronously: a few kB)."""
    return (Path(__file__).resolve().parents[2] / "docs" / page).read_text()


@pytest_asyncio.fixture
async def pool(pg_dsn: str) -> AsyncIterator[safepool.Pool]:
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=3, capture_stack=True) as pool:
        await pool.execute(bp.SCHEMA)
        await pool.execute("TRUNCATE sp_docs_accounts")
        await pool.execute("INSERT INTO sp_docs_accounts VALUES (1, 100), (2, 0)")
        with assert_no_leaks(pool):
            yield pool


async def test_quickstart(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with assert_no_leaks():
        assert await load("quickstart").main(pg_dsn) == 45
    assert "2 connections handed out" in capsys.readouterr().out


async def test_async_with_and_finally(pool: safepool.Pool) -> None:
    assert await bp.account_balance(pool, 1) == 100
    assert await bp.account_balance_without_async_with(pool, 1) == 100
    assert await bp.account_balance(pool, 99) is None


async def test_transaction_commits_or_rolls_back(pool: safepool.Pool) -> None:
    await bp.transfer(pool, 1, 2, 30)
    with pytest.raises(bp.InsufficientFunds):
        await bp.transfer(pool, 2, 1, 1000)
    assert [await bp.account_balance(pool, i) for i in (1, 2)] == [70, 30]
    assert pool.stats().in_use == 0


async def test_long_work_holds_no_connection_while_waiting(pool: safepool.Pool) -> None:
    seen: list[int] = []

    async def post(summary: dict[str, int]) -> None:
        seen.append(pool.stats().in_use)

    assert await bp.publish_balances(pool, post) == {"accounts": 2, "total": 100}
    assert seen == [0]
    written: list[tuple[int, int]] = []

    async def write(account: int, balance: int) -> None:
        written.append((account, balance))

    assert await bp.export_accounts(pool, write) == 2
    assert written == [(1, 100), (2, 0)]


async def test_listen_on_a_dedicated_connection(pool: safepool.Pool, pg_dsn: str) -> None:
    async with bp.Notifications(pg_dsn, "sp_docs_channel") as notifications:
        await bp.notify(pool, "sp_docs_channel", "account 1 changed")
        assert await asyncio.wait_for(notifications.received.get(), 5) == "account 1 changed"
    assert pool.stats().in_use == 0


async def test_pgbouncer_settings_work_on_a_plain_server_too(pg_dsn: str) -> None:
    async with bp.create_pool_behind_pgbouncer(pg_dsn) as pool:
        assert await pool.fetchval("SELECT $1::int + 1", 1) == 2
        first = pool.stats().resets  # auto mode: a new connection's first lease is reset (init=, connect=)
        for _ in range(3):
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT $1::int + 1", 1) == 2
        assert pool.stats().resets == first  # plain queries: nothing to reset
        async with pool.acquire() as con:
            await con.execute("SET TimeZone = 'Asia/Tokyo'")
        assert pool.stats().resets == first + 1  # a SET: the full reset (PgBouncer's tracked copy too)
        async with pool.acquire() as con:
            assert await con.fetchval("SHOW TimeZone") != "Asia/Tokyo"


async def test_the_failover_settings_replace_connections_for_their_age(pg_dsn: str) -> None:
    async with bp.create_pool_that_follows_failovers(pg_dsn) as pool:
        assert pool.options.max_lifetime == 1800.0
        assert pool.options.tcp_keepalive == safepool.TcpKeepalive(idle=30, interval=10, count=3, user_timeout=30)
        assert await pool.fetchval("SELECT $1::int + 1", 1) == 2
        expiries = sorted(slot.expires_at - slot.created_at for slot in pool._state.slots())
        assert len(expiries) == 2 and 1620.0 <= expiries[0] < expiries[1] <= 1800.0


async def test_the_manual_clock_example_of_testing_md(pg_dsn: str) -> None:
    # (The example is a test users copy: it runs as written, and asserts itself.)
    await asyncio.wait_for(testing_clock.test_a_stuck_handler_loses_its_connection_at_the_lease_timeout(pg_dsn), 30)


async def test_with_a_manual_clock_an_acquire_waits_for_advance_not_real_time(pg_dsn: str) -> None:
    """docs/testing.md: acquire(timeout=) runs on the manual clock too: no
    real time ends it; the snippet's task-then-advance pattern does."""
    clock = safepool.ManualClock()
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, clock=clock) as pool:
        async with pool.acquire():  # every connection held
            waiting = asyncio.ensure_future(pool.acquire(timeout=5.0))
            await asyncio.sleep(0)  # it queues
            await asyncio.sleep(0.3)  # real time: nothing
            assert not waiting.done()
            clock.advance(5.0)
            with pytest.raises(safepool.PoolTimeoutError):
                await waiting
    text = _doc("testing.md")
    assert "waiting = asyncio.ensure_future(pool.acquire(timeout=5.0))" in text
    # The example is a bare async test taking `dsn`: the page says what it needs.
    assert "`dsn` is a fixture of yours" in text and "@pytest.mark.asyncio" in text.split("## Testing timeouts", 1)[1]


async def test_close_pool_within_a_deadline_terminates_what_is_left(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=2, capture_stack=True) as idle:
        assert await bp.close_pool_within(idle, 5.0) is True  # nothing held: closed in time
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2, capture_stack=True)
    request = await stuck_in_a_query(pool)
    with caplog.at_level("WARNING", logger="safepool"):
        assert await bp.close_pool_within(pool, 0.2) is False
    assert pool.closed
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await request
    assert any("close() was cut short" in r.getMessage() and "in stuck_request" in r.getMessage()
               for r in caplog.records)


async def test_shutdown_deadline_with_default_settings_names_no_site(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """best-practices.md: with capture_stack off (the default) the warning
    gives the count and ages, "at unknown site (capture_stack is off)", and
    no task: the site and task of the example need capture_stack=True."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2)
    assert pool.capture_stack is False
    request = await stuck_in_a_query(pool, "stuck-task")
    with caplog.at_level("WARNING", logger="safepool"):
        assert await bp.close_pool_within(pool, 0.2) is False
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await request
    (message,) = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "close_cut_short"]
    assert "1 connection(s) not released" in message
    assert "at unknown site (capture_stack is off)" in message and "stuck-task" not in message
    text = _doc("best-practices.md")
    section = text.split("## Shutting down within a deadline", 1)[1].split("\n## ", 1)[0]
    assert "unknown site (capture_stack is" in section and "capture_stack=True" in section


async def test_errors_map_to_http_statuses(pg_dsn: str, pool: safepool.Pool) -> None:
    assert await bp.handle_balance_request(pool, 1) == (200, {"account": 1, "balance": 100})
    assert (await bp.handle_balance_request(pool, 99))[0] == 404
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, max_waiters=0) as tiny:
        async with tiny.acquire():
            status, body = await bp.handle_balance_request(tiny, 1)
    assert status == 503 and "retry" in body["error"]


async def test_leases_endpoint_names_the_holder(pool: safepool.Pool) -> None:
    async with pool.acquire():  # HOLDER
        [lease] = bp.describe_leases(pool)
    assert lease["acquired_at"].endswith(f"test_docs_examples.py:{HOLDER_LINE} in test_leases_endpoint_names_the_holder")
    assert lease["task"] and lease["held_seconds"] >= 0 and lease["expires_in"] is None
    assert bp.describe_leases(pool) == []


async def test_the_site_middleware_of_backpressure_md_names_the_route_and_passes_lifespan(pg_dsn: str) -> None:
    """docs/backpressure.md's ASGI middleware, as printed, around a Starlette
    app whose lifespan opens the pool. It read scope["method"] of every scope,
    so the lifespan scope raised KeyError (uvicorn then runs the app without
    its lifespan: no pool), and it named the site after the raw path (a site
    per URL caps nothing)."""
    import re
    import textwrap

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    text = (EXAMPLES.parent / "backpressure.md").read_text()
    block = re.search(r"```python\n((?:(?!```).)*?async def site_middleware.*?)```", text, re.S)
    assert block is not None
    seen: list[str | None] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with safepool.create_pool(pg_dsn, min_size=1, max_size=2, max_site_share=0.5) as pool:
            app.state.pool = pool
            yield

    async def order(request: Request) -> JSONResponse:
        pool = request.app.state.pool
        async with pool.acquire():
            seen.extend(lease.site for lease in pool.leases())
        return JSONResponse({"id": request.path_params["id"]})

    app = Starlette(routes=[Route("/orders/{id}", order)], lifespan=lifespan)
    namespace: dict[str, object] = {"safepool": safepool, "app": app}
    exec(textwrap.dedent(block[1]), namespace)
    middleware = namespace["site_middleware"]

    received: list[dict[str, str]] = []
    lifespan_done = asyncio.Event()

    async def receive() -> dict[str, str]:
        if not received:
            received.append({"type": "lifespan.startup"})
            return received[-1]
        await lifespan_done.wait()
        return {"type": "lifespan.shutdown"}

    sent: list[dict[str, object]] = []
    started = asyncio.Event()

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            started.set()

    running = asyncio.create_task(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({running, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if running.done():
        running.result()  # the middleware's own error
    assert started.is_set()
    transport = httpx.ASGITransport(app=middleware)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/orders/7")).json() == {"id": "7"}
        assert (await client.get("/orders/8")).json() == {"id": "8"}
    lifespan_done.set()
    await asyncio.wait_for(running, 10)
    assert seen == ["GET /orders/{id}", "GET /orders/{id}"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
