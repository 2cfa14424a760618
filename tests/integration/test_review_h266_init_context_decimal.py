"""Review h266: the context a connect carries to its first lease (fbe4e93)
overwrites what the acquiring task had set: here the task's decimal
context.

fbe4e93 sets, in the task of a connection's first lease, every context
variable the connect's pool task changed (``Runner.connect_slot``,
``_context_set_since``, ``safepool/_runner.py:1226``; set unconditionally in
``Leaser.acquire``, ``safepool/_leasing.py:272-273``). A variable a library
creates lazily counts as changed: ``decimal``'s context lives in a
``ContextVar`` that the first ``Decimal`` operation in a context without one
sets to a fresh default context (precision 28). An ``init=`` that computes
with a ``Decimal`` in a connect spawned from a context that had none (the
min_size upkeep replacing a connection, started by a background task)
hands that default context to the first lease, whose task is inside
``decimal.localcontext(prec=6)``: its arithmetic runs at precision 28 from
``acquire()`` on. On asyncpg's pool ``init=`` runs in the acquiring task,
finds that task's decimal context and sets nothing: precision 6 stays.
"""

from __future__ import annotations

import asyncio
import contextvars
import decimal
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until

pytestmark = pytest.mark.asyncio

RATES: list[decimal.Decimal] = []


async def _init(con: Any) -> None:
    # A setting read at connect and computed with: the Decimal arithmetic
    # uses (and, where the task has none yet, creates) the decimal context.
    rate = await con.fetchval("SELECT 1.5::numeric")
    RATES.append(rate * 2)


async def _first_lease_precision(kind: str, dsn: str) -> tuple[str, int]:
    factory = asyncpg.create_pool if kind == "asyncpg" else safepool.create_pool
    pool = await asyncio.wait_for(factory(dsn, min_size=1, max_size=1, init=_init), 10)
    try:
        async def background() -> None:
            await pool.expire_connections()  # the idle connection is replaced

        # A background task whose context has no decimal context yet.
        await asyncio.get_running_loop().create_task(background(), context=contextvars.Context())
        if kind == "safepool":
            # (Its replacement opened by the min_size upkeep; asyncpg's pool
            # reconnects in the next acquire.)
            await until(lambda: pool.stats().connections_opened == 2)
        seen: list[Any] = []

        async def request() -> None:
            with decimal.localcontext(prec=6):
                async with pool.acquire() as con:
                    seen.append(str(decimal.Decimal(1) / decimal.Decimal(3)))
                    seen.append(decimal.getcontext().prec)
                    await con.fetchval("SELECT 1")

        await asyncio.wait_for(asyncio.create_task(request()), 10)
        return seen[0], seen[1]
    finally:
        pool.terminate()


async def test_asyncpg_keeps_the_acquirers_decimal_context(pg_dsn: str) -> None:
    assert await _first_lease_precision("asyncpg", pg_dsn) == ("0.333333", 6)


async def test_safepool_keeps_the_acquirers_decimal_context(pg_dsn: str) -> None:
    assert await _first_lease_precision("safepool", pg_dsn) == ("0.333333", 6)
