"""What running ORMs' own suites on both pools found (.ci/orm), as tests on both pools.

- tortoise-orm's suite opened 555 server connections on safepool before
  release() awaited the reset, 388 on asyncpg: its calls are acquire, one
  statement, release, in sequence, and the next acquire came while the only
  connection was still resetting, so the pool opened another. Covered by
  test_dropin.py::test_sequential_leases_use_one_connection; the ORM-shaped
  case (a transaction per lease, tortoise's pool sizes) is below.
- tortoise's SSL tests make ``create_pool`` fail on its first connect: asyncpg
  raises and logs nothing; safepool also logged asyncpg's min_size upkeep
  warning ("Failed to restore the pool connection floor; retrying") for a
  pool that is closed and never retries.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from tests._util import MakePool, skip_before_asyncpg
from tests.compat import test_parity as parity

flavour = parity.flavour  # (make_pool: tests/conftest.py)

pytestmark = pytest.mark.asyncio


async def test_sequential_transactions_use_one_connection(
    make_pool: MakePool, app_name: str, server_count: Any
) -> None:
    # tortoise's defaults: minsize 1, maxsize 5; every ORM call is one lease.
    pool = await make_pool(min_size=1, max_size=5, server_settings={"application_name": app_name})
    pids = set()
    for _ in range(20):
        async with pool.acquire() as con, con.transaction():
            pids.add(await con.fetchval("SELECT pg_backend_pid()"))
        async with pool.acquire() as con:
            pids.add(await con.fetchval("SELECT pg_backend_pid()"))
    assert len(pids) == 1
    assert await server_count(app_name) == 1


async def test_failed_creation_logs_no_upkeep_retry(
    flavour: str, make_pool: MakePool, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await make_pool(database="safepool_no_such_database")
    assert [record.getMessage() for record in caplog.records if record.name == "asyncpg.pool"] == []


async def test_failed_acquire_connect_logs_no_upkeep_retry(
    flavour: str, make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    """An acquire's own connect that fails raises to the acquire on both pools;
    asyncpg logs nothing for it. safepool logged asyncpg's min_size upkeep
    warning for it as well (the waiter was failed before the check for
    "nobody waits"): during an outage with traffic, one such line per probe,
    about 20 a second, against asyncpg's 1, 2, 4 ... s schedule (a new user's
    trial, 2026-12-02)."""
    if flavour == "asyncpg":
        skip_before_asyncpg((0, 30), "create_pool(connect=)")
    connects = 0

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        nonlocal connects
        connects += 1
        if connects > 1:
            raise asyncpg.TooManyConnectionsError("sorry, too many clients already")
        return await asyncpg.connect(*args, **kwargs)

    pool = await make_pool(min_size=1, max_size=2, connect=connect)
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    async with pool.acquire():
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await pool.acquire(timeout=5)
    assert connects == 2
    assert [record.getMessage() for record in caplog.records if record.name == "asyncpg.pool"] == []
