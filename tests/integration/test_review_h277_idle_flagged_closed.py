"""Review h277: an idle connection whose ``connection_class`` ``is_closed()``
turns True is handed out again by safepool; asyncpg's acquire replaces it.

A class that retires connections with a health flag (``is_closed()``
returning True for a session it no longer trusts) may set the flag while
the connection is idle in the pool: from a notification or log listener,
a termination listener of another connection, a watchdog task. asyncpg's
``PoolConnectionHolder.acquire`` (0.29-0.32 alike) asks
``if self._con is None or self._con.is_closed()`` before it hands out an
idle connection, and opens a new one in its place: the acquire gets a fresh
backend, whose ``is_closed()`` is False. (asyncpg drops the flagged
connection without closing it: its socket stays open until the garbage
collector; docs/compatibility.md's row covers that at release, on
0.29-0.31.)

safepool's acquire took the idle slot as it was (no ``is_closed()`` for an
idle connection; the pool learnt of a closed connection only from asyncpg's
``_release_on_close``): the acquire got the flagged connection,
``is_closed()`` True, the same backend. Fixed (helper h279): for a class
with an ``is_closed()`` of its own (``Holder.own_is_closed``, read once per
connection), the acquire asks it before the handover
(``Leaser.closed_at_handover``, in the acquire's one test of
``holder.init_context``: no test of its own on the hot path), gives a
flagged connection up (terminated; its place counted towards ``max_size``
until its backend has exited, where asyncpg's pool leaves it open beside
the new one) and acquires again with what is left of the timeout.

Siblings: the flag set while a released connection is on its way to a
waiting task (the contended path's claim; safepool only, see there); an ``is_closed()`` that raises
at the handover (asyncpg's acquire raises it and keeps the connection);
and the ``max_size`` guarantee (the flagged backend is gone before the
replacement is handed out).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import asyncpg_version

pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore::ResourceWarning")]


async def _acquire_after_flag(flavour: str, pg_dsn: str) -> tuple[bool, bool]:
    flagged: set[int] = set()
    made: list[Any] = []

    class FlaggedConnection(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            return id(self) in flagged or super().is_closed()

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=FlaggedConnection)
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        flagged.update(id(raw) for raw in made)  # (idle now: retired by its flag)
        again = await asyncio.wait_for(pool.acquire(), 10)
        try:
            return again.get_server_pid() == pid, again.is_closed()
        finally:
            await pool.release(again)
    finally:
        pool.terminate()
        for raw in made:  # (asyncpg's pool leaves the flagged one open)
            if not raw._aborted and raw._protocol is not None:
                raw._abort()


async def test_an_idle_connection_flagged_closed_is_not_handed_out(pg_dsn: str) -> None:
    expected = await _acquire_after_flag("asyncpg", pg_dsn)
    assert expected == (False, False)  # a new backend, open
    assert await _acquire_after_flag("safepool", pg_dsn) == expected


def _flagged_class(flagged: set[int], made: list[Any], raising: set[int] | None = None) -> type:
    class FlaggedConnection(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            if raising is not None and id(self) in raising:
                raise RuntimeError("health check failed")
            return id(self) in flagged or super().is_closed()

    return FlaggedConnection


def _abort_all(made: list[Any]) -> None:
    for raw in made:  # (asyncpg's pool leaves a flagged one open)
        if not raw._aborted and raw._protocol is not None:
            raw._abort()


async def _waiter_gets_flagged(flavour: str, pg_dsn: str) -> tuple[bool, bool]:
    flagged: set[int] = set()
    made: list[Any] = []
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=_flagged_class(flagged, made))
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        waiting = asyncio.ensure_future(pool.acquire(timeout=10))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await pool.release(con)
        # (Handed on to the waiting task, which has not run yet: flagged now.)
        flagged.update(id(raw) for raw in made)
        again = await asyncio.wait_for(waiting, 10)
        try:
            return again.get_server_pid() == pid, again.is_closed()
        finally:
            await pool.release(again)
    finally:
        pool.terminate()
        _abort_all(made)


async def test_a_connection_flagged_on_its_way_to_a_waiter_is_not_handed_out(pg_dsn: str) -> None:
    """The contended path (``PoolState.claim``) asks too. safepool only:
    asyncpg's waiting task takes the connection (and asks ``is_closed()``)
    inside the release's shielded task's loop pass, before ``release()``
    returns to a program that could flag it; safepool's waiter resumes after
    the release returned, and asks then, as asyncpg's rule has it: right
    before the handover."""
    assert await _waiter_gets_flagged("safepool", pg_dsn) == (False, False)


async def _raising_is_closed(flavour: str, pg_dsn: str) -> tuple[str, bool, int]:
    raising: set[int] = set()
    made: list[Any] = []
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=_flagged_class(set(), made, raising))
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        raising.update(id(raw) for raw in made)
        try:
            await asyncio.wait_for(pool.acquire(), 10)
            outcome = "returned"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        raising.clear()
        async with pool.acquire(timeout=10) as con:  # (kept: the same backend)
            return outcome, con.get_server_pid() == pid, pool.get_size()
    finally:
        pool.terminate()
        _abort_all(made)


async def test_an_is_closed_that_raises_at_acquire(pg_dsn: str) -> None:
    expected = await _raising_is_closed("asyncpg", pg_dsn)
    assert expected == ("RuntimeError: health check failed", True, 1)
    assert await _raising_is_closed("safepool", pg_dsn) == expected


async def test_the_flagged_backend_is_gone_before_its_replacement_is_handed_out(pg_dsn: str) -> None:
    """safepool only (asyncpg's pool leaves the flagged connection open
    beside its replacement: max_size + 1 backends): the flagged connection's
    place counts until its backend has exited, and the stats balance."""
    flagged: set[int] = set()
    made: list[Any] = []
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=_flagged_class(flagged, made))
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        flagged.update(id(raw) for raw in made)
        async with pool.acquire(timeout=10) as con:
            assert con.get_server_pid() != pid and not con.is_closed()
            assert await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid) == 0
            assert pool.get_size() == 1
        s = pool.stats()
        pool._state.check_invariants()
        assert s.acquired == s.released + s.leases_expired + s.leaks_detected + s.leases_discarded + s.in_use
        assert made[0].is_closed() and made[0]._aborted  # (terminated, not left open)
    finally:
        pool.terminate()
        _abort_all(made)


async def test_a_class_that_calls_every_connection_closed(pg_dsn: str) -> None:
    """A class whose ``is_closed()`` is True from the connect on: asyncpg
    0.32's acquire raises ``ConnectionDoesNotExistError`` as it connects
    (0.29-0.31 ask nothing at the connect: compared on 0.32 only); safepool's
    gives up at most ``max_size + 1`` connections in one acquire, then
    raises it too (not an acquire that loops for ever)."""
    made: list[Any] = []

    class AlwaysClosed(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            return True

    factories = (asyncpg.create_pool, safepool.create_pool) if asyncpg_version() >= (0, 32) else (safepool.create_pool,)
    for factory in factories:
        pool = await factory(pg_dsn, min_size=0, max_size=1, connection_class=AlwaysClosed)
        try:
            with pytest.raises(asyncpg.ConnectionDoesNotExistError, match="closed during pool initialization"):
                await asyncio.wait_for(pool.acquire(), 20)
        finally:
            pool.terminate()
            _abort_all(made)
