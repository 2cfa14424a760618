"""Pool connections read at most 64 KiB per recv() on asyncio's selector
transport (``_internals.tune_reads``), leave other transports alone, and
return large results whole. On a real PostgreSQL."""

from __future__ import annotations

import asyncio.selector_events
import io
from typing import Any

import asyncpg
import pytest

from safepool._internals import READ_SIZE

pytestmark = pytest.mark.asyncio

BIG = "SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 5000) g"  # about 1 MB on the wire


async def test_pool_connections_read_64_kib_and_large_results_arrive_whole(pools: Any, pg_dsn: str) -> None:
    pool = await pools(min_size=2, max_size=2)
    raw = await asyncpg.connect(pg_dsn)
    try:
        expected = await raw.fetch(BIG)
        async with pool.acquire() as con:
            transport = con._con._transport
            rows = await con.fetch(BIG)
        assert [tuple(r) for r in rows] == [tuple(r) for r in expected] and len(rows) == 5000
        if type(transport) is asyncio.selector_events._SelectorSocketTransport:
            assert transport.max_size == READ_SIZE == 64 * 1024
            # asyncpg's own connections keep asyncio's 256 KiB: only the pool's change.
            assert raw._transport.max_size == 256 * 1024
        else:
            # uvloop (--loop uvloop): its transport has no read size to set.
            assert not hasattr(transport, "max_size")
    finally:
        await raw.close()


async def test_a_transport_that_already_reads_less_is_left_alone(pools: Any) -> None:
    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        con = await asyncpg.connect(*args, **kwargs)
        if type(con._transport) is asyncio.selector_events._SelectorSocketTransport:
            con._transport.max_size = 4096
        return con

    pool = await pools(min_size=1, max_size=1, connect=connect)
    async with pool.acquire() as con:
        transport = con._con._transport
        assert await con.fetchval("SELECT 1") == 1
    if type(transport) is asyncio.selector_events._SelectorSocketTransport:
        assert transport.max_size == 4096


async def test_copy_out_and_in_of_megabytes_through_64_kib_reads(pools: Any) -> None:
    """COPY streams its data through the same reads: 4 MB out to a buffer and
    back into a table arrive whole (row count and total length)."""
    pool = await pools(min_size=1, max_size=1)
    async with pool.acquire() as con:
        await con.execute("CREATE TEMP TABLE copied (g int, pad text)")
        out = io.BytesIO()
        await con.copy_from_query(
            "SELECT g, repeat('y', 400) FROM generate_series(1, 10000) g", output=out, format="csv"
        )
        size = len(out.getvalue())
        assert size > 4_000_000
        out.seek(0)
        await con.copy_to_table("copied", source=out, format="csv")
        count, total = await con.fetchrow("SELECT count(*), sum(length(pad)) FROM copied")
        await con.execute("DROP TABLE copied")
    assert (count, total) == (10_000, 4_000_000)
