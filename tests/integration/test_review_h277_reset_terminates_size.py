"""Review h277: ``get_size()`` right after a release whose reset terminated
the connection itself still counts it.

A ``connection_class`` whose ``reset()`` ends the connection with
``self.terminate()`` (a class that gives up connections it cannot clean:
a session flagged as poisoned, a prepared-statement cache it cannot trust),
or a ``reset=`` hook that does (asyncpg 0.30+), returns normally; asyncpg's
release returns normally too. asyncpg's holder hears of the termination at
once (``_release_on_close``: ``_con`` is None), so ``get_size()`` no longer
counts it when ``release()`` returns (0 on a one-connection pool, on
asyncpg 0.29-0.32; 0.32 then reopens ``min_size`` in the background).

safepool's slot was CLOSING then, its connection closed, and
``Pool.get_size()`` counted it: the reset ended with the connection closed
and no error, which the pool reads as a socket reset under the reset (its
backend may still run a statement), so the close task sends the backend a
cancel request first, and only then did the slot stop counting. Fixed
(helper h279): ``Runner.close_slot`` puts a slot whose connection is
already closed in ``Runner.exiting`` as its close task starts (get_size()
counts open connections, as asyncpg's); the place still counts towards
``max_size`` until the cancel request was delivered and the backend has
exited (docs/design.md, "Slot states").

Siblings: a reset that closes the connection gracefully (``close()``), and
the ``max_size`` guarantee (the terminated backend is gone before the next
acquire gets its replacement).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import asyncpg_version

pytestmark = pytest.mark.asyncio


async def _size_after_release(flavour: str, pg_dsn: str, how: str) -> tuple[str, int]:
    class GiveUpConnection(asyncpg.Connection):  # type: ignore[misc]
        pass

    options: dict[str, Any] = {}
    graceful = how.endswith("-close")
    if how.startswith("reset-method"):
        async def reset(self: Any, *, timeout: float | None = None) -> None:
            if graceful:
                await self.close()
            else:
                self.terminate()

        GiveUpConnection.reset = reset  # type: ignore[method-assign]
    else:
        async def hook(con: Any) -> None:
            if graceful:
                await con.close()
            else:
                con.terminate()

        options["reset"] = hook
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=GiveUpConnection, **options)
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
        try:
            await pool.release(con)
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__name__
        return outcome, pool.get_size()
    finally:
        pool.terminate()


@pytest.mark.parametrize("how", ["reset-method", "reset-hook", "reset-method-close", "reset-hook-close"])
async def test_size_when_release_returns(pg_dsn: str, how: str) -> None:
    if how.startswith("reset-hook") and asyncpg_version() < (0, 30):
        pytest.skip("asyncpg 0.30+: create_pool(reset=)")
    expected = await _size_after_release("asyncpg", pg_dsn, how)
    assert expected == ("returned", 0)
    assert await _size_after_release("safepool", pg_dsn, how) == expected


@pytest.mark.parametrize("max_size", [1, 2])
async def test_the_terminated_backend_is_gone_before_its_replacement(pg_dsn: str, max_size: int) -> None:
    """safepool: not counted by get_size(), the place still counts towards
    max_size until the backend has exited (with one place, the next
    acquire's connection is opened only then)."""

    class GiveUpConnection(asyncpg.Connection):  # type: ignore[misc]
        async def reset(self, *, timeout: float | None = None) -> None:
            self.terminate()

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=max_size, connection_class=GiveUpConnection)
    try:
        others = [await pool.acquire() for _ in range(max_size - 1)]
        con = await pool.acquire()
        pid = con.get_server_pid()
        await pool.release(con)
        assert pool.get_size() == max_size - 1
        assert pool.stats().size == max_size  # (the place held)
        async with pool.acquire(timeout=10) as con:
            assert con.get_server_pid() != pid
            assert await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid) == 0
        for other in others:
            await pool.release(other)
    finally:
        pool.terminate()
