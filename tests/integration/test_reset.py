"""What happens to a connection's session between leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def make(pg_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    pools: list[safepool.Pool] = []

    async def factory(**kwargs: Any) -> safepool.Pool:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool._state.check_invariants()
        await asyncio.wait_for(pool.close(), 10)


async def test_lease_without_statements_skips_the_reset(make: Any) -> None:
    pool = await make()
    for _ in range(5):
        async with pool.acquire():
            pass
    stats = pool.stats()
    assert stats.resets_skipped == 5 and stats.resets == 0
    assert pool.get_idle_size() == 1  # handed back synchronously, no reset task


async def test_lease_with_a_statement_is_reset_before_release_returns(make: Any) -> None:
    pool = await make()
    async with pool.acquire() as con:
        await con.execute("SET statement_timeout = 1234")
    # As with asyncpg: release() returned after the reset, the connection is idle.
    stats = pool.stats()
    assert (stats.resetting, stats.idle, stats.resets) == (0, 1, 1)
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW statement_timeout") == "0"


async def test_setup_statements_count_as_the_leases(make: Any) -> None:
    async def setup(con: Any) -> None:
        await con.execute("SET search_path TO tenant_a")

    pool = await make(setup=setup)
    async with pool.acquire():
        pass  # no statement of its own; setup's SET must still be reset
    assert pool.stats().resets == 1


async def test_rollback_mode_only_ends_transactions(make: Any) -> None:
    pool = await make(reset_mode="rollback")
    async with pool.acquire() as con:
        await con.execute("SET statement_timeout = 1234")  # session state survives by design
        pid = con.get_server_pid()
    assert pool.stats().resets_skipped == 1
    async with pool.acquire() as con:
        assert con.get_server_pid() == pid
        assert await con.fetchval("SHOW statement_timeout") == "1234ms"
        await con.execute("BEGIN")
        await con.execute("CREATE TEMP TABLE rolled_back (a int)")
    async with pool.acquire() as con:
        assert not con.is_in_transaction()
        assert await con.fetchval("SELECT to_regclass('pg_temp.rolled_back')") is None


async def test_managed_transaction_left_by_an_exception_is_rolled_back(make: Any) -> None:
    pool = await make()
    with pytest.raises(ZeroDivisionError):
        async with pool.acquire() as con:
            async with con.transaction():
                await con.execute("CREATE TEMP TABLE gone (a int)")
                1 / 0  # noqa: B018
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT to_regclass('pg_temp.gone')") is None


async def test_failed_reset_replaces_the_connection(make: Any) -> None:
    async def broken_reset(con: Any) -> None:
        raise RuntimeError("reset hook failed")

    pool = await make(reset=broken_reset)
    # asyncpg raises the reset's error from release(), after closing the connection.
    with pytest.raises(RuntimeError, match="reset hook failed"):
        async with pool.acquire() as con:
            first = con.get_server_pid()
    with pytest.raises(RuntimeError, match="reset hook failed"):
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() != first
    assert pool.stats().resets_failed >= 1


async def test_listeners_are_dropped_even_without_a_reset(make: Any) -> None:
    pool = await make()
    seen: list[str] = []
    async with pool.acquire() as con:
        await con.add_listener("chan", lambda *args: seen.append(args[-1]))
        with pytest.warns(asyncpg.InterfaceWarning, match="active notification listener"):
            await pool.release(con)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
