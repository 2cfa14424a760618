"""Review h249: the paths where a pool closes a connection gracefully while
a call of its lease may still run in another task (session s75's kind:
asyncpg 0.32's ``Connection.close()`` cancels such a call, and resolves it
with ``None`` if the server ends the connection meanwhile).

``Connection.close`` is patched to record whether a statement was in flight
(``_internals.statement_in_flight``) each time a pool calls it. safepool's
pool never calls it so (the close waits for the call: ``_workers.close``);
asyncpg's pool does at ``max_queries`` and for an expired generation, pinned
here. The other paths (``Pool.close()`` after a release refused, a no-op
``reset=`` hook then ``max_inactive_connection_lifetime``,
``reset_mode="rollback"`` and ``"auto"``, a lease timeout's take-back, a
``connection_class`` with its own ``close()`` and ``reset()``) call no
close with a call in flight on either pool. The case where asyncpg is
cancelling an earlier statement when the close comes is
tests/faults/test_review_h249_cancelling_close.py (a bug)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _internals
from tests._util import in_pg_sleep_on, outcome_of, skip_before_asyncpg

pytestmark = pytest.mark.asyncio


class OwnClose(asyncpg.Connection):  # type: ignore[misc]
    async def close(self, *, timeout: float | None = None) -> None:
        await super().close(timeout=timeout)

    async def reset(self, *, timeout: float | None = None) -> None:
        await super().reset(timeout=timeout)


def _record_closes(monkeypatch: Any, admin: Any) -> list[bool]:
    """Whether a call was in flight at each ``Connection.close()`` (but
    ``admin``'s, the test's own)."""
    seen: list[bool] = []
    close = asyncpg.Connection.close

    async def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is not admin:
            seen.append(_internals.statement_in_flight(self))
        return await close(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "close", recording)
    # The spy is the test's, not a close() of the program's: safepool takes it
    # for asyncpg's own (since review h269 a patch of asyncpg's close() is the
    # class's own, and an idle connection's expiry then terminates it, as
    # asyncpg's pool does for such a class: not the path under test).
    monkeypatch.setitem(_internals._ASYNCPG_METHODS, "close", recording)
    monkeypatch.setattr(_internals, "_SAFEPOOL_METHODS", _internals._SAFEPOOL_METHODS | {recording})
    return seen


async def _scenario(pg_dsn: str, monkeypatch: Any, create: Any, path: str) -> tuple[list[bool], Any, Any]:
    admin = await asyncpg.connect(pg_dsn)
    seen = _record_closes(monkeypatch, admin)
    options: dict[str, Any] = {}

    async def noop(con: Any) -> None:
        pass

    if path == "max_queries":
        options["max_queries"] = 2
    elif path == "noop_hook_inactive":
        options.update(reset=noop, max_inactive_connection_lifetime=0.1)
    elif path in ("rollback_mode", "auto_mode"):
        options["reset_mode"] = path.split("_")[0]
    elif path == "lease_timeout":
        options["lease_timeout"] = 0.2
    elif path == "connection_class":
        options["connection_class"] = OwnClose
    pool = await create(pg_dsn, min_size=0, max_size=2, **options)
    try:
        con = await pool.acquire()
        await con.fetchval("SELECT 1")
        call = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(0.5)"))
        await in_pg_sleep_on(admin, con.get_server_pid(), timeout=5)
        if path in ("expired", "expired_timeout", "connection_class"):
            await pool.expire_connections()
        release: Any = None
        if path == "lease_timeout":
            await asyncio.sleep(0.3)
        else:
            release = await outcome_of(pool.release(con, timeout=0.05 if path == "expired_timeout" else None))
        if path == "pool_close":
            await asyncio.wait_for(pool.close(), 10)
        if path == "noop_hook_inactive":
            await asyncio.sleep(0.6)
            assert pool.get_size() == 0
        outcome = await outcome_of(call)
    finally:
        pool.terminate()
        await admin.close()
    return seen, release, outcome


CLOSING_AT_ONCE = ["expired", "expired_timeout", "max_queries", "connection_class"]
OTHERS = ["pool_close", "noop_hook_inactive", "rollback_mode", "auto_mode", "lease_timeout"]
SAFEPOOL_ONLY = {"rollback_mode", "auto_mode", "lease_timeout"}


@pytest.mark.parametrize("path", CLOSING_AT_ONCE + OTHERS)
async def test_safepool_closes_no_connection_with_a_call_in_flight(pg_dsn: str, monkeypatch: Any, path: str) -> None:
    seen, release, outcome = await _scenario(pg_dsn, monkeypatch, safepool.create_pool, path)
    assert True not in seen, seen
    if path in CLOSING_AT_ONCE or path == "noop_hook_inactive":
        assert seen, "no close"
    # The call gets its own outcome: cancelled on the server, or its result.
    assert outcome is None or isinstance(outcome, asyncpg.QueryCanceledError), outcome
    if path in ("pool_close", "rollback_mode", "auto_mode"):
        assert isinstance(release, asyncpg.InterfaceError), release  # (refused reset, as asyncpg's)
    else:
        assert release is None, release


@pytest.mark.parametrize("path", [p for p in CLOSING_AT_ONCE + OTHERS if p not in SAFEPOOL_ONLY])
async def test_asyncpg_pool(pg_dsn: str, monkeypatch: Any, path: str) -> None:
    """asyncpg's pool, pinned: its releases that close at once (expired
    generation, max_queries) close with the call in flight."""
    if path == "noop_hook_inactive":
        skip_before_asyncpg((0, 30), "create_pool(reset=)")
    seen, _release, _outcome = await _scenario(pg_dsn, monkeypatch, asyncpg.create_pool, path)
    if path in CLOSING_AT_ONCE:
        assert seen == [True], seen
    else:
        assert True not in seen, seen
