"""Review h244 (the combined-fault stress tool with multi-step calls,
seed 1 on asyncio): a COPY FROM an asynchronous source whose backend is
terminated mid-copy. On asyncpg's pool the caller gets
``ConnectionDoesNotExistError``; on safepool an untyped ``AttributeError``
('NoneType' object has no attribute 'write').

Cause: safepool reacts to the lost connection of a leased slot at once
(safepool/_holder.py:135 ``_release_on_close`` -> safepool/_runner.py:978
``connection_lost`` -> ``drain`` -> safepool/_runner.py:839 ``close_slot``
-> ``_pg.terminate(con)``, safepool/_internals.py:341), while the lease's
COPY is still in flight (``Holder.copies`` 1). ``terminate()`` aborts the
protocol, which drops its transport (asyncpg protocol.pyx ``abort``:
``self.transport = None``); asyncpg's ``copy_in`` then writes the next
chunk, and its CopyFail, to no transport. asyncpg's pool leaves the lost
connection to the lease until its release: the transport stays (closed),
the writes go nowhere and the COPY ends with the connection's error."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _copy_outcome(create: Any, dsn: str) -> str:
    table = f"h244_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    pool = await create(dsn, min_size=1, max_size=1)
    try:
        await admin.execute(f"CREATE TABLE {table} (tag text)")
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        raw = con._raw if isinstance(pool, safepool.Pool) else con._con  # (safepool's proxy refuses once lost)
        lost = asyncio.Event()

        async def source() -> Any:
            yield b"a\n"
            await lost.wait()  # (the next chunk once the connection is seen lost)
            yield b"b\n"

        call = asyncio.ensure_future(con.copy_to_table(table, source=source(), columns=["tag"]))
        for _ in range(500):  # the COPY under way on the server
            if await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'COPY%' AND state = 'active'",
                    pid):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the COPY never ran")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):
            # (asyncpg calls the connection closed once it reads the FATAL;
            # its transport closes at the EOF behind it: both, so that the
            # next chunk meets a closed transport on either pool.)
            if raw.is_closed() and raw._transport.is_closing():
                break
            await asyncio.sleep(0.01)
        lost.set()
        try:
            await call
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001 (the outcome compared)
            outcome = type(exc).__name__
            call.exception()
        try:
            await pool.release(con)
        except Exception:  # noqa: BLE001 (not compared: the COPY's error is)
            pass
        return outcome
    finally:
        await pool.close()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()


async def test_a_copy_whose_backend_is_terminated_fails_as_on_asyncpg_pool(pg_dsn: str) -> None:
    theirs = await _copy_outcome(asyncpg.create_pool, pg_dsn)
    # asyncio's closed transport drops the write and the COPY ends with the
    # connection's error; uvloop's raises its RuntimeError ("the handler is
    # closed"), on asyncpg's pool as on safepool.
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    assert theirs == ("RuntimeError" if uvloop else "ConnectionDoesNotExistError")
    ours = await _copy_outcome(safepool.create_pool, pg_dsn)
    assert ours == theirs
