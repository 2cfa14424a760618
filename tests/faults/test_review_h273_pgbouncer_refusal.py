"""Review h273: PgBouncer's own login refusals are transient, but the pool's
connect backoff takes them for a final answer.

PgBouncer refuses a client login with SQLSTATE 08P01 (asyncpg's
``ProtocolViolationError``) when it is out of client slots ("no more
connections allowed (max_client_conn)", docs/pgbouncer.md's many-processes
section), when the database is disabled (``DISABLE``: 'database "postgres"
is disabled'), and, behind a PgBouncer started while its server is down,
with "query_wait_timeout" until the server is back. The first is
PgBouncer's 53300, all of them end by themselves: the next connect succeeds
as soon as PgBouncer accepts again. ``_internals.refusal()`` classes 08P01 as
``NOT_REFUSED`` (a wrong password's kind), so with ``fail_fast`` (or
``wait_on_connect_error``) the connects back off from ``Backoff.base`` up to
``cap`` (2 s), and with ``fail_fast`` the breaker fails every acquire with
``ServerUnavailableError`` until the next probe, long after PgBouncer
accepts again. asyncpg's pool serves the first acquire after the slot frees.
A 53300 from PostgreSQL itself is retried within ``refused_cap`` (50 ms).
Fixed: ``_internals.pooler_busy`` tells those wordings apart, and they are
retried as a 53300 is."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool.health import check_health
from tests._pgbouncer import Bouncer, requires_pgbouncer
from tests.faults.test_pgbouncer_outage import start_bouncer  # noqa: F401 (fixture)
from tests.faults.test_review_h210_pgbouncer import DB, admin, bouncer_settings, requires_psql

from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime, requires_pgbouncer]

FAILURES = 5  # refusals in a row before the slot frees: a backoff of 0.8-1.6 s
RECOVERY = 0.25  # seconds: refused_cap (0.05) plus a loaded machine's slack


async def _recovery_after_refusals(
    bouncer: Bouncer, kind: str, block: Callable[[], Awaitable[object]], unblock: Callable[[], Awaitable[object]],
) -> tuple[float, list[str]]:
    """``block()`` has PgBouncer refuse the pool's logins; the pool's
    acquires fail until it has been refused FAILURES times in a row
    (safepool's count, or the ProtocolViolationErrors asyncpg's callers
    got); then ``unblock()`` ends the refusals. How long until an acquire
    succeeds, and the errors callers got meanwhile."""
    await block()
    pool: Any
    if kind == "safepool":
        pool = await safepool.create_pool(
            bouncer.dsn(), min_size=0, max_size=2, statement_cache_size=0, fail_fast=True,
        )
    else:
        pool = await asyncpg.create_pool(bouncer.dsn(), min_size=0, max_size=2, statement_cache_size=0)
    try:
        refused = 0
        deadline = time.monotonic() + 6
        while True:
            try:
                await pool.fetchval("SELECT 1")
            except (asyncpg.ProtocolViolationError, safepool.ServerUnavailableError) as exc:
                refused += isinstance(exc, asyncpg.ProtocolViolationError)
            assert time.monotonic() < deadline, "the pool was not refused as often as expected"
            if kind == "safepool":
                if pool.stats().consecutive_connect_failures >= FAILURES:
                    break
            elif refused >= FAILURES:
                break
            await asyncio.sleep(0.005)
        await unblock()
        cleared = time.monotonic()
        errors: list[str] = []
        while True:
            try:
                assert await pool.fetchval("SELECT 1") == 1
                return time.monotonic() - cleared, errors
            except (asyncpg.ProtocolViolationError, safepool.ServerUnavailableError) as exc:
                errors.append(type(exc).__name__)
            assert time.monotonic() - cleared < 5, "no recovery at all"
            await asyncio.sleep(0.005)
    finally:
        await asyncio.wait_for(pool.close(), 10)


KINDS = ["asyncpg", "safepool"]


@pytest.mark.parametrize("kind", KINDS)
async def test_recovery_after_pgbouncer_max_client_conn_clears_is_as_fast_as_asyncpgs(
    start_bouncer: Callable[..., Bouncer], running: Cluster, kind: str,  # noqa: F811
) -> None:
    """Other clients hold PgBouncer's every client slot (max_client_conn=2);
    one leaves."""
    bouncer = start_bouncer(pool_mode="transaction", default_pool_size=2, max_client_conn=2)
    blockers: list[asyncpg.Connection] = []

    async def block() -> None:
        blockers.extend([await asyncpg.connect(bouncer.dsn(), statement_cache_size=0) for _ in range(2)])

    async def unblock() -> None:
        # close() returns once PgBouncer has closed that client (it answers
        # the Terminate by closing): its slot is free from here on.
        await blockers.pop().close()

    try:
        took, errors = await _recovery_after_refusals(bouncer, kind, block, unblock)
    finally:
        for blocker in blockers:
            await blocker.close()
    print(kind, f"served {took:.3f}s after the slot freed; errors meanwhile: {len(errors)}")
    assert took < RECOVERY, (took, errors[:3], len(errors))


@requires_psql
@pytest.mark.parametrize("kind", KINDS)
async def test_recovery_after_pgbouncer_enable_is_as_fast_as_asyncpgs(
    start_bouncer: Callable[..., Bouncer], running: Cluster, kind: str,  # noqa: F811
) -> None:
    """DISABLE on PgBouncer's console (new logins refused: maintenance, a
    failover script); ENABLE. (A PgBouncer started while its server is down
    refuses logins with 08P01 too, "query_wait_timeout", until the server
    is back: the same backoff then delays the recovery after the outage.)"""
    bouncer = start_bouncer(**bouncer_settings(pool_mode="transaction", default_pool_size=2))
    try:
        took, errors = await _recovery_after_refusals(
            bouncer, kind, lambda: admin(bouncer, f"DISABLE {DB}"), lambda: admin(bouncer, f"ENABLE {DB}"),
        )
    finally:
        with contextlib.suppress(RuntimeError):
            await admin(bouncer, f"ENABLE {DB}")
    print(kind, f"served {took:.3f}s after ENABLE; errors meanwhile: {len(errors)}")
    assert took < RECOVERY, (took, errors[:3], len(errors))


async def test_health_names_a_full_pgbouncer_pooler_busy_not_server_down(
    start_bouncer: Callable[..., Bouncer], running: Cluster,  # noqa: F811
) -> None:
    """With PgBouncer's every client slot held (max_client_conn=2), the
    pool's connects are PgBouncer's refusals: health() says the pooler is
    busy (``pooler_busy``, ``stats().connect_pooler_busy``), not that the
    server is down, which it is not; once a connect succeeds, neither."""
    bouncer = start_bouncer(pool_mode="transaction", default_pool_size=2, max_client_conn=2)
    blockers = [await asyncpg.connect(bouncer.dsn(), statement_cache_size=0) for _ in range(2)]
    pool = await safepool.create_pool(bouncer.dsn(), min_size=0, max_size=2, statement_cache_size=0)
    try:
        with pytest.raises(asyncpg.ProtocolViolationError, match="max_client_conn"):
            await pool.fetchval("SELECT 1")
        report = await check_health(pool, probe=False)
        codes = {reason.code: reason for reason in report.reasons}
        assert report.stats.connect_pooler_busy and report.stats.last_connect_sqlstate == "08P01"
        assert "pooler_busy" in codes and "server_down" not in codes, report.reasons
        assert codes["pooler_busy"].status == "failing"  # (nothing left to serve from)
        assert "max_client_conn" in codes["pooler_busy"].message
        await blockers.pop().close()
        assert await pool.fetchval("SELECT 1") == 1
        report = await check_health(pool, probe=False)
        assert not report.stats.connect_pooler_busy
        assert "pooler_busy" not in {reason.code for reason in report.reasons}
    finally:
        for blocker in blockers:
            await blocker.close()
        await asyncio.wait_for(pool.close(), 10)


async def test_a_lasting_pgbouncer_refusal_is_not_pooler_busy(
    start_bouncer: Callable[..., Bouncer], running: Cluster,  # noqa: F811
) -> None:
    """PgBouncer's 08P01 for a database it does not know does not end by
    itself: not ``pooler_busy`` (the pool's DSN is wrong)."""
    bouncer = start_bouncer(pool_mode="transaction", default_pool_size=2)
    dsn = bouncer.dsn().rsplit("/", 1)[0] + "/no_such_database"
    assert dsn != bouncer.dsn()
    pool = await safepool.create_pool(dsn, min_size=0, max_size=2, statement_cache_size=0)
    try:
        with pytest.raises(asyncpg.ProtocolViolationError):
            await pool.fetchval("SELECT 1")
        report = await check_health(pool, probe=False)
        assert report.stats.last_connect_sqlstate == "08P01" and not report.stats.connect_pooler_busy
        assert "pooler_busy" not in {reason.code for reason in report.reasons}, report.reasons
    finally:
        await asyncio.wait_for(pool.close(), 10)
