"""``pool.health()`` on a real PostgreSQL: each reason, the probe, and the
Starlette readiness endpoint documented in docs/metrics.md."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

import safepool
from safepool import ManualClock
from safepool.health import PROBE_SITE, HealthReport, check_health
from tests._util import connect_once_there_is_room, until

pytestmark = pytest.mark.asyncio
DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def codes(report: HealthReport) -> set[str]:
    return {reason.code for reason in report.reasons}


class FlakyConnect:
    """asyncpg.connect, or a refused connection while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise ConnectionRefusedError("connection refused (test)")
        return await asyncpg.connect(*args, **kwargs)


async def test_healthy_pool_is_ok_with_a_probe_latency(pools: Any) -> None:
    pool = await pools(name="fine")
    report = await pool.health()
    assert isinstance(report, HealthReport)
    assert report.status == "ok" and report.ready and report.reasons == ()
    assert report.probe_latency is not None and 0 < report.probe_latency < 1.0
    assert report.stats.name == "fine" and report.stats.acquired == 1  # the probe's own lease
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "ok" and data["pool"] == "fine"
    assert data["stats"]["acquire_wait"]["count"] == 1 and "bucket_counts" not in data["stats"]["acquire_wait"]
    skipped = await pool.health(probe=False)
    assert skipped.status == "ok" and skipped.probe_latency is None


async def test_check_health_of_an_asyncpg_pool_says_what_it_is(pg_dsn: str) -> None:
    # It probed asyncpg's pool, then failed on "'Pool' object has no attribute 'stats'".
    legacy = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(TypeError, match=r"check_health\(\) expected a safepool pool, got asyncpg\.pool\.Pool: "
                           r"an asyncpg pool"):
            await check_health(legacy)
    finally:
        await legacy.close()


async def test_saturated_pool_is_degraded_not_failing(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(name="full", min_size=1, max_size=1, clock=clock)
    held = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().waiting == 1)
    clock.advance(4.0)
    assert (await pool.health(probe=False, saturated_after=5.0)).status == "ok"
    clock.advance(2.0)
    report = await pool.health(probe_timeout=0.1, saturated_after=5.0)
    # The probe queued behind the waiter and got nothing within its timeout.
    assert codes(report) == {"saturated", "probe_no_connection"}
    assert report.status == "degraded" and report.ready
    saturated = next(r for r in report.reasons if r.code == "saturated")
    assert "1 tasks waiting" in saturated.message and "first for 6.0s" in saturated.message
    await pool.release(held)
    await pool.release(await waiter)
    assert (await pool.health()).status == "ok"


async def test_leak_suspects_name_the_acquire_site(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(name="leaky", clock=clock, leak_warning_after=30.0)
    held = await pool.acquire()  # leak-site marker
    clock.advance(31.0)
    report = await pool.health()
    assert report.status == "degraded" and codes(report) == {"leak_suspects"}
    message = report.reasons[0].message
    assert "1 lease held longer than 30s" in message
    assert re.search(r"test_health\.py:\d+ in test_leak_suspects_name_the_acquire_site", message)
    # An explicit threshold overrides the pool's; a lease younger than it is fine.
    assert (await pool.health(leak_suspect_after=60.0)).status == "ok"
    await pool.release(held)
    assert (await pool.health()).status == "ok"


async def test_no_leak_check_without_a_threshold(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(clock=clock)
    held = await pool.acquire()
    clock.advance(3600)
    assert (await pool.health(probe=False)).status == "ok"
    assert codes(await pool.health(probe=False, leak_suspect_after=60)) == {"leak_suspects"}
    await pool.release(held)


async def test_server_down_is_failing(pools: Any) -> None:
    connect = FlakyConnect()
    connect.down = True
    pool = await pools(name="down", min_size=0, connect=connect)
    report = await pool.health(probe_timeout=2.0)
    assert report.status == "failing" and not report.ready
    assert {"server_down", "probe_failed", "connect_errors"} <= codes(report)
    probe = next(r for r in report.reasons if r.code == "probe_failed")
    assert "ConnectionRefusedError" in probe.message
    errors = next(r for r in report.reasons if r.code == "connect_errors")
    assert "first check of this pool" in errors.message

    connect.down = False
    await until(lambda: pool.stats().server_status == "up" or pool.stats().consecutive_connect_failures > 0)
    async with asyncio.timeout(10):
        while (report := await pool.health(probe_timeout=2.0)).status == "failing":
            await asyncio.sleep(0.05)  # the backoff delays the next attempt
    assert "server_down" not in codes(report)


async def one_connect_failed_beside_a_lease(pool: safepool.Pool) -> None:
    """With connects failing and one connection open (min_size=1,
    max_size=2, wait_on_connect_error=True): a second lease's connect fails
    and its task keeps waiting, since the open connection will come back;
    both leases end. The pool is then backing off with its connection."""
    held = await pool.acquire()
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().connect_errors == 1)
    await pool.release(held)
    await pool.release(await waiter)


async def test_server_down_names_the_last_connect_error_and_no_sqlstate(pools: Any) -> None:
    connect = FlakyConnect()
    connect.down = True
    pool = await pools(name="down", min_size=0, connect=connect)
    report = await pool.health(probe=False)
    with pytest.raises(ConnectionRefusedError):
        await pool.fetchval("SELECT 1")
    report = await pool.health(probe=False)
    assert report.stats.last_connect_error == "ConnectionRefusedError: connection refused (test)"
    assert report.stats.last_connect_sqlstate is None  # (not the server's answer)
    down = next(r for r in report.reasons if r.code == "server_down")
    assert down.message.endswith("(last error: ConnectionRefusedError: connection refused (test))")
    assert "connect_rejected" not in codes(report)
    connect.down = False
    await pool.fetchval("SELECT 1")
    stats = pool.stats()
    assert (stats.last_connect_error, stats.last_connect_sqlstate) == (None, None)  # a connect succeeded


@pytest_asyncio.fixture
async def rejecting_server(pg_dsn: str) -> Any:
    """A role without LOGIN, and a database the role may not connect to."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP DATABASE IF EXISTS sp_health_noconnect")
    await admin.execute("DROP ROLE IF EXISTS sp_health_nologin")
    await admin.execute("DROP ROLE IF EXISTS sp_health_user")
    await admin.execute("CREATE ROLE sp_health_nologin NOLOGIN")
    await admin.execute("CREATE ROLE sp_health_user LOGIN")
    await admin.execute("CREATE DATABASE sp_health_noconnect")
    await admin.execute("REVOKE CONNECT ON DATABASE sp_health_noconnect FROM PUBLIC")
    try:
        yield admin
    finally:
        await admin.execute("DROP DATABASE IF EXISTS sp_health_noconnect WITH (FORCE)")
        await admin.execute("DROP ROLE IF EXISTS sp_health_nologin")
        await admin.execute("DROP ROLE IF EXISTS sp_health_user")
        await admin.close()


@pytest.mark.parametrize(
    "connect_kwargs, error, sqlstate",
    [
        ({"database": "sp_health_no_such_db"}, "InvalidCatalogNameError", "3D000"),
        ({"user": "sp_health_no_such_role"}, "InvalidAuthorizationSpecificationError", "28000"),
        ({"user": "sp_health_nologin"}, "InvalidAuthorizationSpecificationError", "28000"),
        ({"user": "sp_health_user", "database": "sp_health_noconnect"}, "InsufficientPrivilegeError", "42501"),
        ({"server_settings": {"sp_health_no_such_setting": "1"}}, "UndefinedObjectError", "42704"),
        ({"server_settings": {"work_mem": "lots"}}, "InvalidParameterValueError", "22023"),
    ],
    ids=["no-such-database", "no-such-role", "role-without-login", "no-connect-privilege", "unknown-server-setting",
         "bad-server-setting-value"],
)
async def test_a_login_the_server_rejects_is_connect_rejected_not_server_down(
    pools: Any, rejecting_server: Any, connect_kwargs: dict[str, Any], error: str, sqlstate: str
) -> None:
    """A DSN typo, a wrong role or missing grants: the server answered, so
    the report says to check the settings rather than the server (it said
    ``server_down`` before; a readiness endpoint still answers 503)."""
    pool = await pools(name="rejected", min_size=0, **connect_kwargs)
    report = await pool.health(probe_timeout=2.0)
    assert report.status == "failing" and not report.ready
    assert "server_down" not in codes(report) and "connect_rejected" in codes(report)
    assert report.stats.last_connect_sqlstate == sqlstate
    assert report.stats.last_connect_error is not None and report.stats.last_connect_error.startswith(error + ": ")
    rejected = next(r for r in report.reasons if r.code == "connect_rejected")
    assert rejected.status == "failing"
    assert f"SQLSTATE {sqlstate}" in rejected.message and "check the DSN, the credentials, the database name and the server settings" in rejected.message
    assert report.stats.server_status == "down"  # (the pool's view: no connection; unchanged)
    assert json.loads(json.dumps(report.to_dict()))["stats"]["last_connect_sqlstate"] == sqlstate



async def test_a_role_at_its_connection_limit_is_server_full(pools: Any, pg_dsn: str) -> None:
    """``CONNECTION LIMIT`` on the role reached: SQLSTATE 53300 ("too many
    connections for role"), the class-53 code of a full server, not a login
    refused: the settings are right and it passes once the role's other
    connections end, so it is not ``connect_rejected``; nor is the server
    down (it answered): ``server_full``, failing with no connection open,
    which names the error and where to look (docs/runbook.md)."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP ROLE IF EXISTS sp_health_limited")
    await admin.execute("CREATE ROLE sp_health_limited LOGIN CONNECTION LIMIT 1")
    try:
        other = await asyncpg.connect(pg_dsn, user="sp_health_limited")
        pool = await pools(name="limited", min_size=0, max_size=1, user="sp_health_limited")
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await pool.fetchval("SELECT 1")
        report = await pool.health(probe=False)
        assert report.stats.last_connect_sqlstate == "53300"
        assert report.stats.last_connect_error is not None and "too many connections for role" in report.stats.last_connect_error
        assert codes(report) == {"server_full", "connect_errors"} and report.status == "failing"
        full = next(r for r in report.reasons if r.code == "server_full")
        assert full.status == "failing"
        assert "too many connections for role" in full.message and "53300" in full.message
        assert "pg_stat_activity" in full.message and "open connections: 0" in full.message
        await other.close()
        assert await pool.fetchval("SELECT 1") == 1
        stats = pool.stats()
        assert (stats.last_connect_error, stats.last_connect_sqlstate, stats.server_status) == (None, None, "up")
        await pool.close()
    finally:
        await admin.execute("DROP ROLE IF EXISTS sp_health_limited")
        await admin.close()


async def test_a_full_server_beside_open_connections_is_server_full_and_degraded(pools: Any, pg_dsn: str) -> None:
    """The role's CONNECTION LIMIT (2) is reached by the pool's one open
    connection and another client's: a second lease's connect gets 53300
    while the open connection serves on. ``server_full`` then degrades
    the pool and counts its open connection."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP ROLE IF EXISTS sp_health_full")
    await admin.execute("CREATE ROLE sp_health_full LOGIN CONNECTION LIMIT 2")
    try:
        pool = await pools(
            name="full", min_size=1, max_size=2, user="sp_health_full", clock=ManualClock(), wait_on_connect_error=True
        )
        other = await asyncpg.connect(pg_dsn, user="sp_health_full")
        await one_connect_failed_beside_a_lease(pool)
        report = await pool.health()
        assert report.stats.server_status == "backing_off" and report.stats.last_connect_sqlstate == "53300"
        assert codes(report) == {"server_full", "connect_errors"} and report.status == "degraded"
        full = next(r for r in report.reasons if r.code == "server_full")
        assert full.status == "degraded" and "open connections: 1" in full.message
        await other.close()
        await pool.close()
    finally:
        await admin.execute("DROP ROLE IF EXISTS sp_health_full")
        await admin.close()


async def test_a_login_rejected_beside_open_connections_is_degraded(pools: Any, rejecting_server: Any) -> None:
    """A role whose LOGIN was taken away (a rotated or revoked credential):
    the open connections serve on, new ones are rejected."""
    clock = ManualClock()
    pool = await pools(
        name="revoked", min_size=1, max_size=2, user="sp_health_user", clock=clock, wait_on_connect_error=True
    )
    await rejecting_server.execute("ALTER ROLE sp_health_user NOLOGIN")
    await one_connect_failed_beside_a_lease(pool)
    report = await pool.health()
    assert report.stats.server_status == "backing_off" and report.stats.last_connect_sqlstate == "28000"
    assert codes(report) == {"connect_rejected", "connect_errors"}
    assert report.status == "degraded" and report.probe_latency is not None
    assert "open connections: 1" in next(r.message for r in report.reasons if r.code == "connect_rejected")


async def test_backing_off_and_recent_connect_errors_are_degraded(pools: Any) -> None:
    clock = ManualClock()
    connect = FlakyConnect()
    pool = await pools(name="flaky", min_size=1, max_size=2, connect=connect, clock=clock, wait_on_connect_error=True)
    assert (await pool.health()).status == "ok"  # also the baseline for the error window
    connect.down = True
    await one_connect_failed_beside_a_lease(pool)
    report = await pool.health()
    assert report.stats.server_status == "backing_off"
    assert codes(report) == {"server_backing_off", "connect_errors"}
    assert report.status == "degraded"  # the pool still serves from its open connection
    backing_off = next(r.message for r in report.reasons if r.code == "server_backing_off")
    assert backing_off.endswith("; 1 connection still open")  # (was "1 connections")
    assert report.probe_latency is not None

    connect.down = False
    clock.advance(30.0)  # past the backoff: the next connect succeeds
    second = await pool.acquire()
    third = await pool.acquire()
    await pool.release(second)
    await pool.release(third)
    report = await pool.health()
    assert report.stats.server_status == "up"
    assert codes(report) == {"connect_errors"}  # still within the 60 s window
    errors = report.reasons[0].message
    assert errors.startswith("1 connect error in the last 30s")
    clock.advance(61.0)
    assert (await pool.health()).status == "ok"


@pytest.mark.realtime
async def test_probe_query_timeout_is_failing_and_leaves_the_pool_whole(pools: Any) -> None:
    pool = await pools(name="slow", min_size=1, max_size=1)
    report = await pool.health(probe_query="SELECT pg_sleep(10)", probe_timeout=0.2)
    assert report.status == "failing" and codes(report) == {"probe_timeout"}
    # The query was cancelled on the server and the connection came back.
    await until(lambda: pool.stats().idle == 1)
    assert await pool.fetchval("SELECT 1") == 1
    assert (await pool.health()).status == "ok"


async def test_the_probe_is_not_counted_against_the_callers_bulkhead(pools: Any) -> None:
    # max_size=2 at max_site_share=0.5: a site holds one connection. The
    # readiness handler's site holds its one; the probe has a site of its
    # own, so it gets the idle connection instead of queueing behind the
    # caller's cap (it read "probe_no_connection" here: a false degraded).
    pool = await pools(name="bulkhead", min_size=2, max_size=2, max_site_share=0.5)
    with safepool.site("readiness"):
        held = await pool.acquire()
        try:
            report = await pool.health(probe_timeout=0.5)
        finally:
            await pool.release(held)
    assert report.status == "ok" and report.reasons == ()
    assert report.probe_latency is not None
    assert PROBE_SITE == "safepool.health"


async def test_to_dict_is_json_ready_with_the_per_site_stats(pools: Any) -> None:
    """With max_site_share and a lease held, stats.sites held SiteStats
    objects: the docs' readiness endpoint (JSONResponse(report.to_dict()))
    failed with "Object of type SiteStats is not JSON serializable"."""
    pool = await pools(name="sites", min_size=1, max_size=2, max_site_share=0.5)
    held = await pool.acquire(site="orders")
    try:
        report = await pool.health(probe_timeout=0.5)
    finally:
        await pool.release(held)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # (as Starlette's JSONResponse)
    assert data["stats"]["sites"] == [{"site": "orders", "in_use": 1, "waiting": 0}]
    assert data["stats"]["site_cap"] == 1


async def test_closed_pool_is_failing(pools: Any) -> None:
    pool = await pools(name="gone", min_size=0)
    await pool.close()
    report = await check_health(pool)
    assert report.status == "failing" and codes(report) == {"closed"}


async def test_a_pool_whose_event_loop_closed_is_failing_closed(pg_dsn: str) -> None:
    """An ``asyncio.run()`` that ended without ``close()``: ``pool.closed`` is
    true (nothing can use the pool), but health() without a probe read its
    last numbers and said ``ok``, and with one blamed the probe."""
    pools: list[safepool.Pool] = []

    async def serve() -> None:
        pools.append(await safepool.create_pool(pg_dsn, name="orphaned", min_size=1, max_size=2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the connection the loop's end left open
        await asyncio.to_thread(asyncio.run, serve())
        pool = pools.pop()
        assert pool.closed and not pool.is_closing()
        for probe in (False, True):
            report = await check_health(pool, probe=probe)
            assert report.status == "failing" and codes(report) == {"closed"}, (probe, report)
        del pool
        gc.collect()


async def test_probe_error_is_failing(pools: Any) -> None:
    pool = await pools(name="bad-probe")
    report = await pool.health(probe_query="SELECT * FROM no_such_table_here")
    assert report.status == "failing" and codes(report) == {"probe_failed"}
    assert "UndefinedTableError" in report.reasons[0].message


async def test_readiness_endpoint_from_the_docs(pg_dsn: str) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    text = DOC.read_text()
    match = re.search(r"<!-- readiness-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/metrics.md lost its readiness example"
    source = match.group(1)
    assert 'DSN = "' in source
    namespace: dict[str, Any] = {}
    exec(compile(re.sub(r'DSN = ".*"', f"DSN = {pg_dsn!r}", source), str(DOC), "exec"), namespace)
    app = namespace["app"]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/ready")
            assert response.status_code == 200
            assert response.json()["status"] == "ok"
            pool = app.state.pool
            await pool.close()
            response = await client.get("/ready")
            assert response.status_code == 503
            assert response.json()["reasons"][0]["code"] == "closed"


BAD_OPTIONS = [
    # A wrong option is the caller's mistake, raised at the call: before,
    # each of these read as an outage (failing, probe_failed; 0 also closed
    # a connection per call) or was silently accepted.
    ({"probe_timeout": -1}, ValueError, r"probe_timeout must be > 0 seconds, got -1"),
    ({"probe_timeout": 0}, ValueError, r"probe_timeout must be > 0 seconds, got 0"),
    ({"probe_timeout": float("nan")}, ValueError, r"probe_timeout must be > 0 seconds, got nan"),
    ({"probe_timeout": "1"}, TypeError, r"probe_timeout must be a number of seconds, got str"),
    ({"probe_timeout": None}, TypeError, r"probe_timeout must be a number of seconds, got NoneType"),
    ({"probe_timeout": True}, TypeError, r"probe_timeout must be a number of seconds, got bool"),
    ({"saturated_after": -1}, ValueError, r"saturated_after must be >= 0 seconds, got -1"),
    ({"saturated_after": float("nan")}, ValueError, r"saturated_after must be >= 0 seconds, got nan"),
    ({"saturated_after": "5"}, TypeError, r"saturated_after must be a number of seconds, got str"),
    ({"leak_suspect_after": -5}, ValueError, r"leak_suspect_after must be >= 0 seconds, got -5"),
    ({"leak_suspect_after": "30"}, TypeError, r"leak_suspect_after must be a number of seconds or None, got str"),
    ({"connect_error_window": "x"}, TypeError, r"connect_error_window must be a number of seconds, got str"),
    ({"connect_error_window": 0}, ValueError, r"connect_error_window must be > 0 seconds, got 0"),
    ({"connect_error_window": -60}, ValueError, r"connect_error_window must be > 0 seconds, got -60"),
    ({"probe": "yes"}, TypeError, r"probe must be True or False, got 'yes'"),
    ({"probe": 1}, TypeError, r"probe must be True or False, got 1"),
    ({"probe_query": b"SELECT 1"}, TypeError, r"probe_query must be a str, got bytes"),
    # An int no float can hold raised OverflowError, not the documented ValueError.
    ({"probe_timeout": 10**400}, ValueError, r"probe_timeout is too large for a number of seconds"),
    ({"leak_suspect_after": 10**400}, ValueError, r"leak_suspect_after is too large for a number of seconds \(None turns it off\)"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS, ids=[repr(o) for o, _, _ in BAD_OPTIONS])
async def test_bad_options_raise_at_the_call_not_as_an_outage(
    pools: Any, caplog: pytest.LogCaptureFixture, options: dict[str, Any], error: type[Exception], message: str,
) -> None:
    pool = await pools(name="options", min_size=1, max_size=1)
    with pytest.raises(error, match=f"^{message}$"):
        await pool.health(**options)
    with pytest.raises(error, match=f"^{message}$"):
        await check_health(pool, **options)
    # Nothing ran: no probe lease, no connection closed, nothing logged.
    stats = pool.stats()
    assert stats.acquired == 0 and stats.connections_closed == 0 and stats.idle == 1
    assert not [r for r in caplog.records if r.name.startswith("safepool")]


@pytest.mark.parametrize("options", [
    {"probe_timeout": 0.5}, {"probe_timeout": 2}, {"probe_timeout": float("inf")},
    {"saturated_after": 0}, {"saturated_after": 0.25},
    {"leak_suspect_after": 0}, {"leak_suspect_after": None}, {"leak_suspect_after": 30},
    {"connect_error_window": 1}, {"connect_error_window": 0.5},
    {"probe": False}, {"probe_query": "SELECT 2"},
], ids=repr)
async def test_valid_options_still_work(pools: Any, options: dict[str, Any]) -> None:
    pool = await pools(name="options-ok", min_size=1, max_size=1)
    report = await pool.health(**options)
    assert report.status == "ok" and report.reasons == ()
    assert (report.probe_latency is None) == (options.get("probe") is False)


class BrokenInit:
    """An init= hook with an application bug while ``broken`` is set."""

    def __init__(self) -> None:
        self.broken = True

    async def __call__(self, con: Any) -> None:
        await con.execute("SELECT 1")  # the connection works
        if self.broken:
            raise ValueError("bug in init hook")


@pytest.mark.parametrize("fail_fast", [False, True])
async def test_init_hook_failure_is_not_reported_as_the_server_down(
    pools: Any, caplog: pytest.LogCaptureFixture, fail_fast: bool,
) -> None:
    init = BrokenInit()
    with pytest.raises(ValueError, match="bug in init hook"):
        await pools(name="init-bug", min_size=1, init=init, fail_fast=fail_fast)  # as asyncpg's create_pool
    pool = await pools(name="init-bug", min_size=0, init=init, fail_fast=fail_fast)
    caplog.set_level("DEBUG", logger="safepool")
    for _ in range(4):
        # The hook's own error, as from asyncpg's acquire: with fail_fast too
        # (before: ServerUnavailableError "the server refuses new ones" from
        # the third on).
        with pytest.raises(ValueError, match="bug in init hook"):
            await pool.acquire(timeout=10)
    stats = pool.stats()
    assert stats.server_status == "up" and stats.init_failing
    assert stats.consecutive_connect_failures == 4 and stats.unavailable_rejections == 0
    records = [r for r in caplog.records if r.name == "safepool"]
    messages = [r.getMessage() for r in records]
    failed = "pool 'init-bug': the init hook failed on a new connection (ValueError: bug in init hook), " \
        "which the pool closes; {} consecutive failures"
    # The first at WARNING, the next within the second at DEBUG (one
    # WARNING a second while connects go on failing).
    logged = {r.getMessage(): r.levelname for r in records}
    assert logged[failed.format(1)] == "WARNING" and logged[failed.format(4)] == "DEBUG"
    assert not [m for m in messages if "server status" in m or "connect failed" in m]
    report = await pool.health(probe=False)
    assert report.status == "failing" and "server_down" not in codes(report)
    reason = next(r for r in report.reasons if r.code == "init_failed")
    assert reason.status == "failing" and "the init hook failed on new connections (4 in a row" in reason.message

    init.broken = False
    async with pool.acquire(timeout=10) as con:
        assert await con.fetchval("SELECT 1") == 1
    stats = pool.stats()
    assert stats.server_status == "up" and not stats.init_failing and stats.consecutive_connect_failures == 0
    assert "init_failed" not in codes(await pool.health(probe=False))


@pytest.mark.parametrize("fail_fast", [False, True])
async def test_a_connect_error_of_the_programs_own_is_raised_not_the_breakers(pools: Any, fail_fast: bool) -> None:
    """A misspelled connect keyword (a new user's walk, 2026-12-04): every
    connect raises asyncpg's ``TypeError``, and asyncpg's acquire raises it
    each time. With ``fail_fast=True`` safepool counted it toward the
    breaker as the server's failure and answered ``ServerUnavailableError``
    ("the server refuses new ones", an HTTP 503) from the third acquire on,
    hiding the bug's type. As an ``init=`` hook's error, it no longer counts."""
    pool = await pools(name="typo", min_size=0, fail_fast=fail_fast, command_timout=5)
    for _ in range(4):
        with pytest.raises(TypeError, match="command_timout"):
            await pool.acquire(timeout=10)
    stats = pool.stats()
    assert stats.unavailable_rejections == 0 and stats.consecutive_connect_failures == 4
    assert pool._state.server_failures == 0  # (what the breaker counts)


async def broken_connect(*args: Any, **kwargs: Any) -> Any:
    return await asyncpg.conect(*args, **kwargs)  # type: ignore[attr-defined]  # (the bug: a typo)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"command_timout": 5}, "TypeError: connect() got an unexpected keyword argument 'command_timout'"),
        ({"ssl": "sometimes"}, "ClientConfigurationError: "),
        ({"connect": broken_connect}, "AttributeError: module 'asyncpg' has no attribute 'conect'"),
    ],
    ids=["misspelled-keyword", "bad-option-value", "connect-callable-bug"],
)
async def test_a_connect_failing_on_the_programs_own_arguments_is_connect_misconfigured(
    pools: Any, kwargs: dict[str, Any], error: str
) -> None:
    """Not server_down: the server was never asked (it said server_down
    before, and sent the operator to a healthy database)."""
    pool = await pools(name="typo", min_size=0, **kwargs)
    report = await pool.health(probe_timeout=2.0)
    assert report.status == "failing"
    assert "connect_misconfigured" in codes(report) and "server_down" not in codes(report)
    stats = report.stats
    assert stats.connect_misconfigured and stats.last_connect_sqlstate is None
    assert stats.last_connect_error is not None and stats.last_connect_error.startswith(error)
    reason = next(r for r in report.reasons if r.code == "connect_misconfigured")
    assert reason.status == "failing" and "fix what create_pool() passes to asyncpg.connect()" in reason.message


@pytest.mark.parametrize("fail_fast", [False, True])
async def test_a_dsn_port_out_of_range_is_connect_misconfigured_not_server_down(
    pools: Any, pg_dsn: str, fail_fast: bool, loop_name: str
) -> None:
    """docs/metrics.md: connect_misconfigured is "an option or DSN it cannot
    use", failing "before the server was asked". A port above 65535 is one:
    no packet leaves the host, and no server will ever answer at it.

    On uvloop no such error comes: its create_connection() keeps the port's
    low 16 bits (99999 becomes 34463) and asks that port. The pool then
    raises what asyncpg.connect() raises on that loop, as asyncpg's pool
    does, and counts a refused connect, not a misconfiguration."""
    parts = urlsplit(pg_dsn)
    dsn = urlunsplit(parts._replace(netloc=f"app:pw-{uuid.uuid4().hex}@127.0.0.1:99999", query=""))
    pool = await pools(name="port-typo", dsn=dsn, min_size=0, fail_fast=fail_fast)
    if loop_name == "uvloop":
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(dsn, timeout=10)
        with pytest.raises(ConnectionRefusedError):
            await pool.acquire(timeout=10)
        report = await pool.health(probe=False)
        assert "connect_misconfigured" not in codes(report), report.reasons
        assert not report.stats.connect_misconfigured and report.stats.consecutive_connect_failures == 1
        return
    for _ in range(4):
        with pytest.raises(OverflowError, match="port must be 0-65535"):
            await pool.acquire(timeout=10)
    report = await pool.health(probe=False)
    assert "connect_misconfigured" in codes(report) and "server_down" not in codes(report), report.reasons
    assert report.stats.connect_misconfigured and report.stats.unavailable_rejections == 0


async def test_connect_misconfigured_clears_once_a_connect_succeeds(pg_dsn: str) -> None:
    async with safepool.create_pool(pg_dsn, min_size=0, max_size=1, command_timout=5) as pool:
        with pytest.raises(TypeError):
            await pool.fetchval("SELECT 1")
        assert pool.stats().connect_misconfigured
        pool.set_connect_args(pg_dsn)  # (the fixed arguments)
        await pool.fetchval("SELECT 1")
        stats = pool.stats()
        assert not stats.connect_misconfigured and stats.last_connect_error is None
        assert (await pool.health()).status == "ok"


async def test_init_failures_do_not_count_toward_the_breaker_refusals_do(pools: Any) -> None:
    connect = FlakyConnect()
    init = BrokenInit()
    pool = await pools(name="init-breaker", min_size=0, init=init, connect=connect, fail_fast=True)
    for _ in range(3):
        with pytest.raises(ValueError, match="bug in init hook"):
            await pool.acquire(timeout=10)
    # The server goes away: the breaker counts from here (it opens on the
    # third refusal), not from the init failures before (before: the first
    # refusal made 4 failures and opened it).
    connect.down = True
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            await pool.acquire(timeout=10)
    assert pool.stats().server_status == "down" and not pool.stats().init_failing
    with pytest.raises(safepool.ServerUnavailableError, match=r"the server refuses new ones \(last error: "
                                                               r"ConnectionRefusedError"):
        await pool.acquire(timeout=10)
    assert "server_down" in codes(await pool.health(probe=False))


async def test_a_connection_lost_during_init_is_a_server_failure(pools: Any) -> None:
    async def lost(con: Any) -> None:
        con.terminate()
        raise ConnectionResetError("connection lost (test)")

    pool = await pools(name="init-lost", min_size=0, init=lost)
    with pytest.raises(ConnectionResetError):
        await pool.acquire(timeout=10)
    stats = pool.stats()
    assert stats.server_status == "down" and not stats.init_failing


async def test_server_full_clears_once_the_server_has_room_again(pools: Any, pg_dsn: str) -> None:
    """Another client holds one of the role's two slots; the pool's second
    lease gets 53300. Then the other client goes: the server has room, and
    the pool serves every lease it is asked for while idling at min_size
    with one connection, so it never connects again. health() said
    ``server_full`` (degraded) for ever; now the failure view goes stale
    60 s after the failure (no connect wanted since): ``up`` again, and the
    ``server_status`` event says so at that moment."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP ROLE IF EXISTS sp_health_room_again")
    await admin.execute("CREATE ROLE sp_health_room_again LOGIN CONNECTION LIMIT 2")
    try:
        clock = ManualClock()
        events: list[dict[str, Any]] = []
        other = await asyncpg.connect(pg_dsn, user="sp_health_room_again")
        pool = await pools(name="room-again", min_size=1, max_size=2, user="sp_health_room_again", clock=clock)
        pool.add_listener(events.append)
        held = await pool.acquire()
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await pool.acquire()
        await pool.release(held)
        await other.close()  # the server has a slot for the pool again
        # (There is room, once the backend of `other` has exited: proof.)
        other_again = await connect_once_there_is_room(pg_dsn, user="sp_health_room_again")
        await other_again.close()
        clock.advance(59.0)  # still within the failure's 60 s: the last news
        report = await pool.health()
        assert "server_full" in codes(report) and report.stats.server_status == "backing_off"
        assert [e["to"] for e in events if e["event"] == "server_status"] == ["backing_off"]
        clock.advance(1.0)  # 60 s since the failure, no connect wanted since
        report = await pool.health()
        assert report.probe_latency is not None  # the probe was served
        assert "server_full" not in codes(report), report.reasons
        assert report.stats.server_status == "up"
        assert report.stats.consecutive_connect_failures == 1  # (no connect since: kept for the next one)
        assert [(e["from"], e["to"]) for e in events if e["event"] == "server_status"] == [
            ("up", "backing_off"), ("backing_off", "up"),
        ]
        assert report.status == "ok", report.reasons
    finally:
        await admin.execute("DROP ROLE IF EXISTS sp_health_room_again")
        await admin.close()


async def test_connect_errors_end_with_their_window(pools: Any, pg_dsn: str) -> None:
    """One failed connect (53300, as above), then nothing fails any more
    and the pool serves. Checks 10 windows apart (no usable baseline) said
    'connect errors in a row (first check of this pool)' for ever: the run
    of failures counts only while its last is within the window
    (``stats().last_connect_failure_age``)."""
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP ROLE IF EXISTS sp_health_window")
    await admin.execute("CREATE ROLE sp_health_window LOGIN CONNECTION LIMIT 2")
    try:
        clock = ManualClock()
        other = await asyncpg.connect(pg_dsn, user="sp_health_window")
        pool = await pools(name="window", min_size=1, max_size=2, user="sp_health_window", clock=clock)
        held = await pool.acquire()
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await pool.acquire()
        await pool.release(held)
        await other.close()
        window = 5.0
        report = await pool.health(connect_error_window=window)  # the first check: the current run counts
        assert "connect_errors" in codes(report) and report.stats.last_connect_failure_age == 0.0
        clock.advance(10 * window)
        report = await pool.health(connect_error_window=window)
        assert report.stats.last_connect_failure_age == 10 * window
        assert "connect_errors" not in codes(report), report.reasons
        clock.advance(10 * window)
        report = await pool.health(connect_error_window=window)
        assert "connect_errors" not in codes(report), report.reasons
    finally:
        await admin.execute("DROP ROLE IF EXISTS sp_health_window")
        await admin.close()


async def test_an_init_failure_stops_counting_once_no_connect_would_refresh_it(pools: Any) -> None:
    """The init= hook failed once, on a connection the pool opened beyond
    min_size; the pool then idles at min_size with one that serves, and
    never connects again. As a refusal's does, that failure stops counting
    60 s on (STALE_FAILURE_AFTER): init_failed leaves health(), and
    stats().init_failing (safepool_init_failing) reads False; the status
    was "up" throughout."""
    clock = ManualClock()
    init = BrokenInit()
    init.broken = False
    pool = await pools(name="init-once", min_size=1, max_size=2, init=init, clock=clock)
    held = await pool.acquire(timeout=10)
    init.broken = True
    with pytest.raises(ValueError, match="bug in init hook"):
        await pool.acquire(timeout=10)
    await pool.release(held)
    report = await pool.health(probe=False)
    assert "init_failed" in codes(report) and report.stats.init_failing
    clock.advance(59.0)
    assert "init_failed" in codes(await pool.health(probe=False))
    clock.advance(1.5)
    report = await pool.health()
    assert report.status == "ok", report.reasons
    assert not report.stats.init_failing and report.stats.server_status == "up"
    assert report.stats.consecutive_connect_failures == 1  # (kept: the next connect meets its record)


async def test_pool_health_takes_check_healths_options_typed(pg_dsn: str) -> None:
    """``Pool.health()`` names check_health's options, with the same defaults
    and types (helper-174: it took ``**options``, so a type checker let
    ``probe_timout=`` through and the TypeError named ``check_health()``)."""
    import inspect

    ours = list(inspect.signature(safepool.Pool.health).parameters.values())[1:]
    theirs = list(inspect.signature(check_health).parameters.values())[1:]
    assert [(p.name, p.kind, p.default, p.annotation) for p in ours] == [
        (p.name, p.kind, p.default, p.annotation) for p in theirs
    ]
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(TypeError, match="health"):
            await pool.health(probe_timout=0.5)  # type: ignore[call-arg]
        assert (await pool.health(probe_timeout=0.5)).status == "ok"
