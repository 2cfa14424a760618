"""Review h251 (exploration)."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


def _futures(raw: Any) -> list[str]:
    return [("done" if f.done() else "pending") for f in gc.get_referents(raw._protocol) if isinstance(f, asyncio.Future)]


async def _outcome(create: Any, dsn: str, how: str, release_timeout: float | None, **opts: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    table = f"h251_copy_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE TABLE {table} (tag text)")
    pool = await create(dsn, min_size=1, max_size=1, **opts)
    out: dict[str, Any] = {}
    try:
        con = await pool.acquire()
        raw = con._raw if isinstance(pool, safepool.Pool) else con._con
        pid = await con.fetchval("SELECT pg_backend_pid()")
        if how == "statement_timeout":
            await con.execute("SET statement_timeout = 100")
        first, gate = asyncio.Event(), asyncio.Event()

        async def source() -> Any:
            yield b"a\n"
            first.set()
            await gate.wait()
            yield b"b\n"

        copy = asyncio.ensure_future(con.copy_to_table(table, source=source(), columns=["tag"]))
        await asyncio.wait_for(first.wait(), 5)
        if how == "cancel":
            for _ in range(500):
                if await admin.fetchval("SELECT query LIKE 'COPY%' AND state = 'active' FROM pg_stat_activity WHERE pid = $1", pid):
                    break
                await asyncio.sleep(0.01)
            out["cancel_sent"] = await admin.fetchval("SELECT pg_cancel_backend($1)", pid)
        for _ in range(500):
            if await admin.fetchval("SELECT state = 'idle' FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.01)
        for _ in range(500):
            if not _futures(raw):
                break
            await asyncio.sleep(0.01)
        out["futures_before"] = _futures(raw)
        out["cancelling_before"] = raw._protocol._is_cancelling()
        copy.cancel()
        try:
            await asyncio.wait_for(copy, 5)
            out["copy"] = "returned"
        except BaseException as exc:  # noqa: BLE001
            out["copy"] = type(exc).__name__
        await asyncio.sleep(0.2)
        out["cancelling_after_copy"] = raw._protocol._is_cancelling()
        out["futures_after_copy"] = _futures(raw)
        t0 = loop.time()
        try:
            await asyncio.wait_for(pool.release(con, timeout=release_timeout), 5)
            out["release"] = "ok"
        except BaseException as exc:  # noqa: BLE001
            out["release"] = f"{type(exc).__name__}"
        out["release_s"] = round(loop.time() - t0, 2)
        out["raw_closed"] = raw.is_closed()
        out["cancelling_after_release"] = raw._protocol._is_cancelling() if raw._protocol else None
        try:
            con2 = await asyncio.wait_for(pool.acquire(), 3)
            out["reacquire_same_raw"] = (con2._raw if isinstance(pool, safepool.Pool) else con2._con) is raw
            out["reacquire_pid_same"] = await asyncio.wait_for(con2.fetchval("SELECT pg_backend_pid()"), 3) == pid
            await asyncio.wait_for(pool.release(con2), 3)
        except BaseException as exc:  # noqa: BLE001
            out["reacquire"] = type(exc).__name__ + str(exc)[:80]
        gate.set()
    finally:
        pool.terminate()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
        loop.set_exception_handler(old)
    out["errors"] = errors
    return out


@pytest.mark.parametrize("how", ["cancel", "statement_timeout"])
@pytest.mark.parametrize("release_timeout", [None, 1.0])
async def test_explore(pg_dsn: str, how: str, release_timeout: float | None) -> None:
    a = await _outcome(asyncpg.create_pool, pg_dsn, how, release_timeout)
    print("\nASYNCPG", how, release_timeout, a)
    s = await _outcome(safepool.create_pool, pg_dsn, how, release_timeout)
    print("SAFEPOOL", how, release_timeout, s)
    s = await _outcome(safepool.create_pool, pg_dsn, how, release_timeout, reset_timeout=2.0)
    print("SAFEPOOL rt=2", how, release_timeout, s)
