"""Review h269: a patch of asyncpg's own ``Connection`` class is bypassed by
safepool's release.

Instrumentation and site-wide fixes patch methods on ``asyncpg.Connection``
itself rather than passing a ``connection_class``: Sentry's
``AsyncPGIntegration.setup_once()`` does ``asyncpg.Connection.execute =
_wrap_execute(asyncpg.Connection.execute)`` and records a span for each
``execute(query)`` without arguments. asyncpg's pool resets a released
connection through those methods (``Connection.reset()``, which calls
``self.execute(reset_query)``), so the patched methods run on every
release, as they would for a subclass overriding them.

safepool decides whether a connection class has "a method of its own" by
comparing the class's attribute with ``asyncpg.Connection``'s current one
(``_pg.overrides``, safepool/_internals.py:775, read for ``execute`` at
safepool/_holder.py:129; ``reset`` at safepool/_options.py:291): a patch of
asyncpg's class itself reads as asyncpg's own, and the release then sends
the reset to asyncpg's protocol directly (safepool/_leasing.py:627), so
a patched ``execute()`` is not called (no span for the reset) and a patched
``reset()`` never runs (the session state it restores is missing from the
next lease). Patching a subclass passed as ``connection_class`` works on
both pools (controls below; tests/integration/test_reset.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio

REASON = (
    "_pg.overrides (safepool/_internals.py:775) compares the class's method with asyncpg.Connection's current one: "
    "a patch of asyncpg.Connection itself reads as asyncpg's own method, and the release resets through the "
    "protocol directly (execute: safepool/_holder.py:129; reset: safepool/_options.py:291)"
)
FLAVOURS = ["asyncpg", pytest.param("safepool", marks=pytest.mark.xfail(strict=True, reason=REASON))]


class AppConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class of the application's (for the controls)."""


def _factory(flavour: str) -> Any:
    return asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool


def _record_execute(monkeypatch: pytest.MonkeyPatch, cls: type, seen: list[str]) -> None:
    """Sentry's patch: a wrapper around ``cls.execute`` that records each
    query sent without arguments."""
    original = cls.execute

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:
            seen.append(query)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(cls, "execute", execute)


async def _executes_seen_at_release(flavour: str, dsn: str, connection_class: type, seen: list[str]) -> list[str]:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1, connection_class=connection_class), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            reset_query = con.get_reset_query()
            assert await con.fetchval("SELECT 1") == 1  # (a statement: both pools reset this lease)
            seen.clear()
        return [query for query in seen if query == reset_query]
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_connection_execute_sees_the_reset(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _record_execute(monkeypatch, asyncpg.Connection, seen)
    assert len(await _executes_seen_at_release(flavour, pg_dsn, asyncpg.Connection, seen)) == 1


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_control_a_patched_connection_class_execute_sees_the_reset(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _record_execute(monkeypatch, AppConnection, seen)
    assert len(await _executes_seen_at_release(flavour, pg_dsn, AppConnection, seen)) == 1


def _patch_reset(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """A site-wide fix: every released connection gets the application's
    schema back (a tenant's search_path set by a lease is never inherited)."""
    original = cls.reset

    async def reset(self: Any, *, timeout: float | None = None) -> None:
        await original(self, timeout=timeout)
        await self.execute("SET search_path TO pg_catalog, public")

    monkeypatch.setattr(cls, "reset", reset)


async def _search_path_after_a_lease(flavour: str, dsn: str, connection_class: type) -> str:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1, connection_class=connection_class), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            await con.execute("SET search_path TO tenant_42")
        async with pool.acquire(timeout=5) as con:
            return str(await con.fetchval("SHOW search_path"))
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_connection_reset_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_reset(monkeypatch, asyncpg.Connection)
    assert await _search_path_after_a_lease(flavour, pg_dsn, asyncpg.Connection) == "pg_catalog, public"


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_control_a_patched_connection_class_reset_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_reset(monkeypatch, AppConnection)
    assert await _search_path_after_a_lease(flavour, pg_dsn, AppConnection) == "pg_catalog, public"
