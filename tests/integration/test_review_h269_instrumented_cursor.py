"""Review h269: tracing instrumentation of a cursor's iteration is bypassed.

OpenTelemetry's asyncpg instrumentation (``AsyncPGInstrumentor().instrument()``,
opentelemetry-instrumentation-asyncpg, used by Logfire and most APM set-ups)
wraps ``asyncpg.cursor.CursorIterator.__anext__`` on asyncpg's class (with
wrapt), as it wraps ``Connection.fetch`` and ``Cursor.fetch``, and emits a
``CURSOR: SELECT`` span per step of ``async for row in con.cursor(...)``.
On asyncpg's pool the lease's iterator is asyncpg's own class, so every step
goes through the wrapper. On safepool the factory a lease's ``cursor()``
returns hands out iterators whose class is swapped for
``_CountedCursorIterator`` (safepool/proxy.py:313-320), whose ``__anext__``
overrides the (patched) class attribute and calls asyncpg's original
function captured at import (``_next_row``, safepool/proxy.py:294): the
wrapper never runs, and the spans of every server-side cursor iteration
disappear from the traces. Checked with the real instrumentation
(opentelemetry-instrumentation-asyncpg 0.66b2, SDK 1.45, in-memory
exporter): a 3-row iteration gives 4 ``CURSOR: SELECT`` spans on asyncpg's
pool, none on safepool. The test wraps the class attribute the way the
instrumentation does (a wrapper in the class, calling the function it
replaced), so it needs no tracing package. docs/migration.md says the
class of a lease's cursor factory differs (``type(f) is
asyncpg.cursor.CursorFactory`` does not hold), not that patches of asyncpg's
cursor methods are skipped.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import asyncpg
import asyncpg.cursor
import pytest

import safepool

pytestmark = pytest.mark.asyncio

def _instrument(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, seen: list[str]) -> None:
    """What the instrumentation does to ``cls.name``: a wrapper in its place
    that records the step (a span) and calls the function it replaced."""
    original = getattr(cls, name)

    @functools.wraps(original)
    async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(f"CURSOR: {self._query}")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, traced)


async def _report(factory: Any, dsn: str) -> list[int]:
    """A report endpoint streaming rows through a server-side cursor."""
    pool = await asyncio.wait_for(factory(dsn, min_size=1, max_size=1), 10)
    try:
        async with pool.acquire(timeout=5) as con, con.transaction():
            return [row["n"] async for row in con.cursor("SELECT generate_series(1, 3) AS n", prefetch=10)]
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_an_instrumented_cursor_iteration_is_seen(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _instrument(monkeypatch, asyncpg.cursor.CursorIterator, "__anext__", seen)
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    assert await _report(factory, pg_dsn) == [1, 2, 3]
    # Three rows and the step that ends the iteration.
    assert seen == ["CURSOR: SELECT generate_series(1, 3) AS n"] * 4


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_control_an_instrumented_cursor_fetch_is_seen(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: ``Cursor.fetch`` (``await con.cursor(...)``, then fetch),
    wrapped the same way, is seen on both pools: safepool's cursor objects
    are asyncpg's own class."""
    seen: list[str] = []
    _instrument(monkeypatch, asyncpg.cursor.Cursor, "fetch", seen)
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await asyncio.wait_for(factory(pg_dsn, min_size=1, max_size=1), 10)
    try:
        async with pool.acquire(timeout=5) as con, con.transaction():
            cursor = await con.cursor("SELECT generate_series(1, 3) AS n")
            assert [row["n"] for row in await cursor.fetch(3)] == [1, 2, 3]
    finally:
        pool.terminate()
    assert seen == ["CURSOR: SELECT generate_series(1, 3) AS n"]


def _instrument_sync(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, seen: list[str]) -> None:
    """As :func:`_instrument`, for a method that is not a coroutine function
    (``__aiter__``, ``__await__``)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(f"{name}: {self._query}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, traced)


@pytest.mark.parametrize("name", ["__aiter__", "__await__"])
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_an_instrumented_cursor_factory_is_seen(
    flavour: str, name: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The siblings: the factory's methods patched in asyncpg's class (the
    lease's factory is safepool's subclass, which calls them through
    ``super()``), the iteration and the opening."""
    seen: list[str] = []
    _instrument_sync(monkeypatch, asyncpg.cursor.CursorFactory, name, seen)
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await asyncio.wait_for(factory(pg_dsn, min_size=1, max_size=1), 10)
    try:
        async with pool.acquire(timeout=5) as con, con.transaction():
            if name == "__aiter__":
                rows = [row["n"] async for row in con.cursor("SELECT generate_series(1, 3) AS n")]
            else:
                rows = [row["n"] for row in await (await con.cursor("SELECT generate_series(1, 3) AS n")).fetch(3)]
    finally:
        pool.terminate()
    assert rows == [1, 2, 3]
    assert seen == [f"{name}: SELECT generate_series(1, 3) AS n"]


async def _release_during_a_step(pg_dsn: str, entered: asyncio.Event) -> tuple[str, str, bool]:
    """A lease's cursor step (its fetch sleeps on the server) and the
    lease's release from another task meanwhile: (the step's outcome, the
    release's, whether the next lease finds a clean connection)."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        con = await pool.acquire()
        transaction = con.transaction()
        await transaction.start()
        iterator = con.cursor("SELECT n, pg_sleep(0.2) FROM generate_series(1, 3) AS n", prefetch=1).__aiter__()
        step = asyncio.ensure_future(iterator.__anext__())
        await asyncio.wait_for(entered.wait(), 10)
        release = asyncio.ensure_future(pool.release(con))
        outcomes = await asyncio.wait_for(asyncio.gather(step, release, return_exceptions=True), 10)
        async with pool.acquire(timeout=5) as again:
            clean = await again.fetchval("SELECT 1") == 1 and not again.is_in_transaction()
    finally:
        pool.terminate()
    return type(outcomes[0]).__name__, type(outcomes[1]).__name__, clean


async def test_a_release_during_an_instrumented_step_ends_as_during_asyncpgs_own(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patched step is still counted on the lease (``Holder.copies``):
    a release made while it runs ends as while asyncpg's own step runs
    (tests/integration/test_review_h240.py), not as a release with nothing
    running."""
    entered = asyncio.Event()
    original = asyncpg.cursor.CursorIterator.__anext__
    unpatched = asyncio.Event()
    unpatched.set()
    plain = await _release_during_a_step(pg_dsn, unpatched)

    @functools.wraps(original)
    async def traced(self: Any) -> Any:
        entered.set()
        return await original(self)

    monkeypatch.setattr(asyncpg.cursor.CursorIterator, "__anext__", traced)
    assert await _release_during_a_step(pg_dsn, entered) == plain
