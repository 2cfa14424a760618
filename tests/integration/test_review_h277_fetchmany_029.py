"""Review h277: on asyncpg 0.29, safepool's ``Pool`` has a ``fetchmany()``
that cannot work, where asyncpg 0.29's ``Pool`` has none.

``Pool.fetchmany()`` and ``Connection.fetchmany()`` came with asyncpg 0.30.
docs/compatibility.md: "What an older asyncpg lacks is missing through
safepool too: ``Connection.fetchmany()`` and ``Pool.fetchmany()``, ...".
But ``safepool.Pool.fetchmany`` is defined on every asyncpg
(safepool/pool.py:771): on 0.29 ``hasattr(pool, "fetchmany")`` is True, and
the call acquires a connection, then fails with ``AttributeError`` from the
proxy (0.29's ``Connection`` has no ``fetchmany``).

A library that supports several asyncpg releases detects the method, and
falls back to ``executemany``/a loop where it is missing. On asyncpg 0.29's
pool that program works; on safepool with asyncpg 0.29 it takes the
``fetchmany`` branch and raises ``AttributeError``. (On 0.30+ both pools
take the ``fetchmany`` branch: the control.)
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import asyncpg_version

pytestmark = pytest.mark.asyncio

ON_029 = asyncpg_version() < (0, 30)


async def doubled(pool: Any, values: list[int]) -> tuple[str, list[int]]:
    """A library's feature detection: fetchmany() where the pool has it."""
    if hasattr(pool, "fetchmany"):
        rows = await pool.fetchmany("SELECT $1::int * 2", [(v,) for v in values])
        return "fetchmany", [row[0] for row in rows]
    async with pool.acquire() as con:
        return "fallback", [await con.fetchval("SELECT $1::int * 2", v) for v in values]


async def _run(flavour: str, pg_dsn: str) -> Any:
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1)
    try:
        try:
            return await doubled(pool, [1, 2, 3])
        except Exception as exc:
            return type(exc).__name__
    finally:
        pool.terminate()


async def test_feature_detection_of_pool_fetchmany(pg_dsn: str) -> None:
    expected = await _run("asyncpg", pg_dsn)
    assert expected == ("fallback" if ON_029 else "fetchmany", [2, 4, 6])
    assert await _run("safepool", pg_dsn) == expected
