"""Review h246: ``Holder.cleaned_up`` (safepool/_holder.py:140) and its use
in ``Runner.close_slot`` (safepool/_runner.py:841): a connection asyncpg
ended and cleaned up itself is no longer terminated by the pool's close."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


def _raw(pool: Any, con: Any) -> Any:
    return con._raw if isinstance(pool, safepool.Pool) else con._con


async def _backend_alive(admin: Any, pid: int) -> bool:
    return bool(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


class _Counting(asyncpg.Connection):  # type: ignore[misc]
    """A connection class with a terminate() of its own (counted)."""

    terminated = 0

    def terminate(self) -> None:
        type(self).terminated += 1
        super().terminate()


async def _terminate_calls(create: Any, dsn: str, how: str) -> int:
    admin = await asyncpg.connect(dsn)
    _Counting.terminated = 0
    pool = await create(dsn, min_size=1, max_size=1, connection_class=_Counting)
    try:
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        raw = _raw(pool, con)
        if how == "terminate":
            con.terminate()
        elif how == "close":
            await con.close()
        else:  # the backend killed while leased
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            async with asyncio.timeout(5):
                while not raw.is_closed():
                    await asyncio.sleep(0.01)
        await pool.release(con)
        async with pool.acquire(timeout=5) as again:  # a new connection serves
            assert await again.fetchval("SELECT pg_backend_pid()") != pid
        async with asyncio.timeout(5):
            while await _backend_alive(admin, pid):
                await asyncio.sleep(0.01)
        return _Counting.terminated
    finally:
        await pool.close()
        await admin.close()


@pytest.mark.parametrize("how", ["terminate", "close", "killed"])
async def test_a_class_terminate_runs_as_often_as_on_asyncpg_pool_for_a_connection_asyncpg_ended(
    pg_dsn: str, how: str
) -> None:
    # A connection the lease terminated or closed itself, or whose backend
    # was killed: asyncpg's pool does not call the class's terminate() again
    # at the release (its holder was let go by _release_on_close); nor does
    # safepool since cleaned_up (before, it ran twice for a lease's own
    # terminate()).
    theirs = await _terminate_calls(asyncpg.create_pool, pg_dsn, how)
    assert theirs == (1 if how == "terminate" else 0)
    ours = await _terminate_calls(safepool.create_pool, pg_dsn, how)
    assert ours == theirs


class _Retired(asyncpg.Connection):  # type: ignore[misc]
    """A connection class with an is_closed() of its own (a health flag), as
    tests/integration/test_reset.py's _ClosedAfterUse."""

    retired = False  # (set on the instance)

    def is_closed(self) -> bool:
        return self.retired or super().is_closed()


async def _retired_close(create: Any, dsn: str, how: str) -> tuple[bool, bool]:
    """The lease retires its connection (the class's flag) and closes or
    terminates it: whether its socket (asyncpg's transport) is closed after
    the release, and whether its backend has exited 1 s later."""
    admin = await asyncpg.connect(dsn)
    pool = await create(dsn, min_size=1, max_size=1, connection_class=_Retired)
    try:
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        raw = _raw(pool, con)
        transport = raw._transport
        raw.retired = True
        if how == "close":
            await con.close()  # (asyncpg's close() asks is_closed() first: nothing sent)
        else:
            con.terminate()
        await pool.release(con)  # (the flag still up: the connection stays retired)
        await asyncio.sleep(0.1)
        closed = transport.is_closing()
        for _ in range(100):
            if not await _backend_alive(admin, pid):
                break
            await asyncio.sleep(0.01)
        gone = not await _backend_alive(admin, pid)
        if not closed:
            transport.abort()  # (the test's own cleanup: no ResourceWarning from it)
        return closed, gone
    finally:
        await pool.close()
        await admin.close()
        gc.collect()



@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_a_retired_connection_the_lease_closes_itself_is_not_left_open(pg_dsn: str, how: str) -> None:
    # A class whose is_closed() says closed (a health flag) while the socket
    # is open: the lease's close() sends nothing and only cleans up (asyncpg
    # calls _release_on_close, so cleaned_up is set); terminate() on asyncpg
    # < 0.32 does not abort either. cleaned_up must not make the pool skip
    # the abort that closes the socket: safepool closes it and the backend
    # exits, on 0.29 and 0.32 (asyncpg's pool leaves it open in the close
    # case, and on 0.29 in the terminate case too: not compared).
    ours = await _retired_close(safepool.create_pool, pg_dsn, how)
    assert ours == (True, True)
    theirs = await _retired_close(asyncpg.create_pool, pg_dsn, how)
    if how == "close":
        assert theirs == (False, False)  # asyncpg's pool's leak (both versions)


async def _listener_calls(create: Any, dsn: str, how: str) -> list[str]:
    admin = await asyncpg.connect(dsn)
    pool = await create(dsn, min_size=1, max_size=1)
    calls: list[str] = []
    try:
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        raw = _raw(pool, con)
        con.add_termination_listener(lambda c: calls.append("proxy" if c is con else "raw" if c is raw else "other"))
        if how == "terminate":
            con.terminate()
        else:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            async with asyncio.timeout(5):
                while not raw.is_closed():
                    await asyncio.sleep(0.01)
        await pool.release(con)
        for _ in range(5):
            await asyncio.sleep(0.01)
        return calls
    finally:
        await pool.close()
        await admin.close()


@pytest.mark.parametrize("how", ["terminate", "killed"])
async def test_a_termination_listener_runs_once_as_on_asyncpg_pool(pg_dsn: str, how: str) -> None:
    theirs = await _listener_calls(asyncpg.create_pool, pg_dsn, how)
    assert len(theirs) == 1
    ours = await _listener_calls(safepool.create_pool, pg_dsn, how)
    assert ours == theirs
