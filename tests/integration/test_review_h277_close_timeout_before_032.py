"""Review h277: on asyncpg 0.29-0.31, a release that closes its connection
(``max_queries`` reached, or ``expire_connections()`` called during the
lease) calls a ``connection_class``'s ``close()`` without the release's
budget.

asyncpg's release (0.29-0.32 alike) closes such a connection with
``await self._con.close(timeout=timeout)``: the release's ``timeout=``, else
the acquire's (``PoolConnectionHolder.release``). A class with a ``close()``
of its own gets that ``timeout=`` (to bound a last statement of its own, an
audit record, or to hand it to ``super().close()``).

safepool passed the budget only on 0.32 (``_internals.CLOSE_UNDER_BUDGET``):
on 0.29-0.31 the release set no ``close_budget`` and the close task called
``await con.close()`` with no ``timeout=`` (bounded from outside by
DEFAULT_RESET_TIMEOUT instead). The class's ``close()`` saw ``{}`` where
asyncpg's pool passes ``{"timeout": 3}``. (safepool's reason,
``CLOSE_UNDER_BUDGET``'s comment: a ``close(timeout=)`` that runs out leaves
its transport open on 0.29-0.31. That is asyncpg's own close, which a
class's ``close()`` may still be handed.) Fixed (helper h279): a class with
a ``close()`` of its own (``Holder.own_close``) gets the release's budget on
every version, and the release raises what it raised, as asyncpg's;
asyncpg's own ``close()`` keeps the pool's bound on 0.29-0.31, and
``_internals.terminate`` aborts the transport such a close left open.

On 0.32 both pass it (a control; safepool passes what is left of the
budget, so the value is compared to within a second). Sibling: with no
budget at all, both pools pass ``timeout=None`` (safepool called ``close()``
with no argument there, on every version).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _close_calls(flavour: str, pg_dsn: str, how: str, where: str) -> tuple[str, list[dict[str, Any]], int]:
    calls: list[dict[str, Any]] = []

    class AuditedConnection(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, **kwargs: Any) -> None:
            calls.append(dict(kwargs))
            await super().close(**kwargs)

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    options: dict[str, Any] = {"max_queries": 1} if how == "max_queries" else {}
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=AuditedConnection, **options)
    try:
        con = await pool.acquire(timeout=3 if where == "acquire" else None)
        await con.execute("SELECT 1")
        if how == "expire":
            await pool.expire_connections()
        try:
            await asyncio.wait_for(pool.release(con, timeout=3 if where == "release" else None), 10)
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__name__
        return outcome, calls, pool.get_size()
    finally:
        pool.terminate()


def _rounded(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (round(v) if isinstance(v, float) else v) for k, v in kwargs.items()} for kwargs in calls]


@pytest.mark.parametrize("where", ["release", "acquire", "none"], ids=["release-timeout", "acquire-timeout", "no-timeout"])
@pytest.mark.parametrize("how", ["max_queries", "expire"])
async def test_close_gets_the_release_budget(pg_dsn: str, how: str, where: str) -> None:
    expected = await _close_calls("asyncpg", pg_dsn, how, where)
    assert expected == ("returned", [{"timeout": None if where == "none" else 3}], 0)  # (asyncpg 0.29-0.32 alike)
    outcome, calls, size = await _close_calls("safepool", pg_dsn, how, where)
    assert (outcome, _rounded(calls), size) == expected
