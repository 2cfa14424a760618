"""helper-174 (a new user porting an asyncpg service): what broke, as strict
xfails."""

from __future__ import annotations

from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


@pytest.mark.xfail(
    strict=True,
    reason=(
        "acquire_timeout=0 (a pool that never waits for a connection) is taken, but it is also every "
        "lease's release budget: each release after a statement raises a bare TimeoutError and closes "
        "the connection, and the next acquires time out while the pool reconnects; reset_timeout=0 "
        "is refused at create_pool() for exactly that effect"
    ),
)
async def test_a_pool_with_acquire_timeout_zero_is_refused_or_serves_its_leases(pg_dsn: str, app_name: str) -> None:
    try:
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, acquire_timeout=0, server_settings={"application_name": app_name}
        )
    except safepool.PoolValueError:
        return  # refused at create_pool(), as reset_timeout=0 and lease_timeout=0 are: fine
    try:
        pids: list[Any] = []
        for _ in range(3):
            async with pool.acquire() as con:  # an idle connection: no wait needed
                pids.append(await con.fetchval("SELECT pg_backend_pid()"))
        assert len(set(pids)) == 1  # one connection, reset and reused
        assert pool.stats().connections_closed == 0
    finally:
        pool.terminate()
