"""A COPY from an asynchronous source whose lease another task releases
while the COPY waits for its next chunk (the stress tool's mid-call
release, seed 18): the reset is refused ("another operation is in
progress") and the pool gives the connection up, which takes the transport
from asyncpg's protocol; the COPY's next chunk then fails with asyncpg's
untyped ``AttributeError``. asyncpg's pool terminates the connection at
once, safepool once the release's budget has run out (it waits for the
statement to end first: docs/migration.md); the outcomes are the same, on both loops
(checked by hand on uvloop), loop errors included."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _outcome(create: Any, dsn: str) -> tuple[str, str, list[str]]:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    table = f"s74_copy_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE TABLE {table} (tag text)")
    pool = await create(dsn, min_size=1, max_size=1)
    try:
        con = await pool.acquire()
        first, go = asyncio.Event(), asyncio.Event()

        async def source() -> Any:
            yield b"a\n"
            first.set()
            await go.wait()
            yield b"b\n"

        call = asyncio.ensure_future(con.copy_to_table(table, source=source(), columns=["tag"]))
        await asyncio.wait_for(first.wait(), 5)
        with pytest.raises(asyncpg.InterfaceError) as refused:
            # (Within the release's budget: safepool's wait for the COPY to
            # end took reset_timeout's 30 s before s74.)
            await asyncio.wait_for(pool.release(con, timeout=0.2), 5)
        go.set()
        with pytest.raises(Exception) as failed:  # noqa: PT011 (the class is the outcome compared)
            await asyncio.wait_for(call, 5)
        async with pool.acquire(timeout=5) as again:  # a new connection serves
            assert await again.fetchval("SELECT count(*) FROM " + table) == 0  # the COPY wrote nothing
        for _ in range(3):
            await asyncio.sleep(0)
        return str(refused.value), f"{type(failed.value).__name__}: {failed.value}", errors
    finally:
        await pool.close()
        loop.set_exception_handler(old)
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()


async def test_a_copy_whose_lease_another_task_releases_fails_as_on_asyncpg_pool(pg_dsn: str) -> None:
    theirs = await _outcome(asyncpg.create_pool, pg_dsn)
    assert theirs[:2] == (
        "cannot perform operation: another operation is in progress",
        "AttributeError: 'NoneType' object has no attribute 'write'",
    )  # asyncpg's behaviour
    ours = await _outcome(safepool.create_pool, pg_dsn)
    assert ours == theirs
