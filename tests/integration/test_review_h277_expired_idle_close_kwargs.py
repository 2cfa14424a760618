"""Review h277: an idle connection of an expired generation is closed with
``close()`` where asyncpg's pool calls ``close(timeout=None)``.

After ``pool.expire_connections()``, asyncpg's next acquire of an idle
connection closes it in a task of its own with
``self._con.close(timeout=self._timeout)`` (``PoolConnectionHolder.acquire``,
asyncpg 0.29-0.32 alike; ``_timeout`` is None there, the last release reset
it). A ``connection_class`` whose ``close()`` takes the keyword (its own
signature, ``async def close(self, *, timeout)``, or one that records or
forwards it) gets ``timeout=None`` from asyncpg's pool.

safepool's close task called ``await con.close()`` with no argument when it
had no budget: the class's ``close()`` saw ``{}``, and one that requires the
keyword failed with ``TypeError`` (safepool then terminated the connection:
the class's close never ran). On every supported asyncpg (0.29-0.32).
Fixed (helper h279): the close passes ``close(timeout=None)`` where
asyncpg's pool passes the keyword (``Holder.close_timeout``, and a
connection of an expired generation outside ``Pool.close()``:
``Runner.close_slot``; ``_workers.close(keyword=)``), and ``close()`` with
none where asyncpg's does (``Pool.close()``, a failed ``setup=``).

(safepool closes an expired idle connection at ``expire_connections()``,
asyncpg's pool at the next acquire, or in ``Pool.close()`` with no
argument should none come: safepool's close passes what asyncpg's acquire
would.)

Siblings: a class whose ``close()`` requires the keyword; ``Pool.close()``
(both pools call ``close()`` with no argument). A release's close with no
budget is in ``test_review_h277_close_timeout_before_032.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _close_calls(flavour: str, pg_dsn: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    class AuditedConnection(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, **kwargs: Any) -> None:
            calls.append(dict(kwargs))
            await super().close(**kwargs)

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=AuditedConnection)
    try:
        async with pool.acquire(timeout=5) as con:
            await con.execute("SELECT 1")
        await pool.expire_connections()
        async with pool.acquire(timeout=5) as con:
            await con.execute("SELECT 1")
        for _ in range(50):  # (asyncpg closes it in a task of its own)
            if calls:
                break
            await asyncio.sleep(0.02)
        return calls
    finally:
        pool.terminate()


async def test_an_expired_idle_connection_is_closed_as_asyncpg_closes_it(pg_dsn: str) -> None:
    expected = await _close_calls("asyncpg", pg_dsn)
    assert expected == [{"timeout": None}]
    assert await _close_calls("safepool", pg_dsn) == expected


async def _required_keyword(flavour: str, pg_dsn: str) -> tuple[list[Any], bool]:
    closed: list[Any] = []

    class KeywordConnection(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, *, timeout: float | None) -> None:  # (no default: required)
            closed.append(timeout)
            await super().close(timeout=timeout)

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=KeywordConnection)
    try:
        async with pool.acquire(timeout=5) as con:
            first = con._con
        await pool.expire_connections()
        async with pool.acquire(timeout=5) as con:
            await con.execute("SELECT 1")
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.02)
        for _ in range(50):
            if first._protocol is None:
                break
            await asyncio.sleep(0.02)
        return closed, first._aborted
    finally:
        pool.terminate()


async def test_a_close_that_requires_the_keyword(pg_dsn: str) -> None:
    expected = await _required_keyword("asyncpg", pg_dsn)
    assert expected == ([None], False)  # closed by the class's close(), not aborted
    assert await _required_keyword("safepool", pg_dsn) == expected


async def _pool_close_calls(flavour: str, pg_dsn: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    class AuditedConnection(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, **kwargs: Any) -> None:
            calls.append(dict(kwargs))
            await super().close(**kwargs)

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=AuditedConnection)
    try:
        async with pool.acquire(timeout=5) as con:
            await con.execute("SELECT 1")
        await asyncio.wait_for(pool.close(), 10)
        return calls
    finally:
        pool.terminate()


async def test_pool_close_calls_close_with_no_argument(pg_dsn: str) -> None:
    expected = await _pool_close_calls("asyncpg", pg_dsn)
    assert expected == [{}]
    assert await _pool_close_calls("safepool", pg_dsn) == expected
