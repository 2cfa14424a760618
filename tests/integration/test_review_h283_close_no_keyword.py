"""Review h283: a release that closes its connection (``max_queries``, an
expired generation) with no budget (no ``timeout=`` on the acquire or the
release), through a connection class's own ``close()`` that fails: one that
takes no ``timeout`` keyword (``async def close(self)``), which 8b075ac now
hands ``timeout=None`` as asyncpg's pool does, or one that raises.
asyncpg's release awaits ``close(timeout=None)`` and raises its error;
safepool's close runs the same call, terminates the connection on the error
and the release returns as if the close went well. With a budget both
raise it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore::ResourceWarning")]


async def _release_outcome(flavour: str, pg_dsn: str, how: str, budget: float | None, kind: str) -> str:
    made: list[Any] = []

    class OwnClose(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        if kind == "no_keyword":
            async def close(self) -> None:  # type: ignore[override]
                await super().close()
        else:
            async def close(self, *, timeout: float | None = None) -> None:
                raise RuntimeError("close failed")

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    options: dict[str, Any] = {"max_queries": 1} if how == "max_queries" else {}
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=OwnClose, **options)
    try:
        con = await pool.acquire(timeout=budget)
        await con.execute("SELECT 1")
        if how == "expire":
            await pool.expire_connections()
        try:
            await asyncio.wait_for(pool.release(con), 10)
            return "returned"
        except Exception as exc:
            return type(exc).__name__
        # (asyncpg's pool loses the holder when its release raises there:
        # its next acquire waits for ever; not compared.)
    finally:
        pool.terminate()
        for raw in made:
            if not raw._aborted and raw._protocol is not None:
                raw._abort()


@pytest.mark.parametrize("close", ["no_keyword", "raises"])
@pytest.mark.parametrize("how", ["max_queries", "expire"])
async def test_a_failing_close_with_a_budget(pg_dsn: str, how: str, close: str) -> None:
    expected = await _release_outcome("asyncpg", pg_dsn, how, 5.0, close)
    assert expected in ("TypeError", "RuntimeError")
    assert await _release_outcome("safepool", pg_dsn, how, 5.0, close) == expected


@pytest.mark.parametrize("close", ["no_keyword", "raises"])
@pytest.mark.parametrize("how", ["max_queries", "expire"])
async def test_a_failing_close_without_a_budget(pg_dsn: str, how: str, close: str) -> None:
    expected = await _release_outcome("asyncpg", pg_dsn, how, None, close)
    assert expected in ("TypeError", "RuntimeError")
    assert await _release_outcome("safepool", pg_dsn, how, None, close) == expected
