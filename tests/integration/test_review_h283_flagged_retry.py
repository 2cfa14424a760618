"""Review h283: the acquire that gives up a connection its class's own
``is_closed()`` flags (``Leaser.closed_at_handover``) and acquires again
(``Leaser.acquire_again``), attacked: cancellation and timeouts while the
retry waits, setup= and lease_timeout on the retried lease, site caps and
the adaptive queue, close()/terminate() during the retry, an is_closed()
that flips or raises; books, invariants and server backends after each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import safepool
from tests._util import cancelled, until

pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore::ResourceWarning")]


def _flagged_class(flagged: set[int], made: list[Any]) -> type:
    class FlaggedConnection(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            return id(self) in flagged or super().is_closed()

    return FlaggedConnection


def _abort_all(made: list[Any]) -> None:
    for raw in made:
        if not raw._aborted and raw._protocol is not None:
            raw._abort()


def _books(pool: Any) -> None:
    s = pool.stats()
    assert s.acquired == s.released + s.leases_expired + s.leaks_detected + s.leases_discarded + s.in_use, s
    pool._state.check_invariants()


class Slow:
    """An init= that sleeps ``delay`` seconds on every connect after the first."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0

    async def __call__(self, con: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            await asyncio.sleep(self.delay)


@contextlib.asynccontextmanager
async def flagged_pool(
    flavour: str, pg_dsn: str, app_name: str, **kwargs: Any
) -> AsyncIterator[tuple[Any, set[int], list[Any]]]:
    flagged: set[int] = set()
    made: list[Any] = []
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("max_size", 1)
    pool = await factory(
        pg_dsn, connection_class=_flagged_class(flagged, made),
        server_settings={"application_name": app_name}, **kwargs,
    )
    try:
        yield pool, flagged, made
    finally:
        pool.terminate()
        _abort_all(made)


async def _cancel_during_retry(flavour: str, pg_dsn: str, app_name: str, how: str) -> str:
    async with flagged_pool(flavour, pg_dsn, app_name, init=Slow(1.0)) as (pool, flagged, made):
        async with pool.acquire() as con:
            pass
        flagged.update(id(raw) for raw in made)

        async def acquire() -> str:
            try:
                if how == "timeout_arg":
                    con = await pool.acquire(timeout=0.3)
                elif how == "asyncio.timeout":
                    async with asyncio.timeout(0.3):
                        con = await pool.acquire()
                elif how == "wait_for":
                    con = await asyncio.wait_for(pool.acquire(), 0.3)
                elif how == "anyio":
                    with anyio.move_on_after(0.3) as scope:
                        con = await pool.acquire()
                    if scope.cancelled_caught:
                        return "anyio cancelled"
                else:
                    con = await pool.acquire()
            except TimeoutError:
                return "TimeoutError"
            await pool.release(con)
            return "acquired"

        task = asyncio.ensure_future(acquire())
        if how in ("cancel", "cancel_twice"):
            await asyncio.sleep(0.3)
            task.cancel()
            if how == "cancel_twice":
                await asyncio.sleep(0)
                task.cancel()
            try:
                outcome = await task
            except asyncio.CancelledError:
                outcome = "cancelled"
        else:
            outcome = await task
        # The pool goes on: the next acquire gets an open connection.
        async with pool.acquire(timeout=10) as con:
            assert not con.is_closed()
            assert await con.fetchval("SELECT 1") == 1
        if flavour == "safepool":
            await until(lambda: pool.stats().in_use == 0)
            _books(pool)
            assert pool.get_size() <= 1
        return outcome


@pytest.mark.parametrize("how", ["cancel", "cancel_twice", "timeout_arg", "asyncio.timeout", "wait_for", "anyio"])
async def test_cancelled_while_the_retry_waits(pg_dsn: str, app_name: str, how: str) -> None:
    expected = await _cancel_during_retry("asyncpg", pg_dsn, app_name, how)
    assert await _cancel_during_retry("safepool", pg_dsn, app_name, how) == expected


async def test_backends_never_exceed_max_size_through_retries(pg_dsn: str, app_name: str, server_count: Any) -> None:
    """Many tasks, every idle connection flagged again and again: the server
    never sees more than max_size backends of the pool's, the books balance."""
    async with flagged_pool("safepool", pg_dsn, app_name, min_size=2, max_size=2) as (pool, flagged, made):
        peak = 0
        stop = False
        sizes: set[int] = set()

        async def watch() -> None:
            nonlocal peak
            while not stop:
                peak = max(peak, await server_count(app_name))
                sizes.add(pool.get_size())
                await asyncio.sleep(0.002)

        async def worker(n: int) -> None:
            for _ in range(8):
                async with pool.acquire(timeout=20) as con:
                    await con.fetchval("SELECT 1")
                    if n % 2:
                        flagged.add(id(con._con))  # flagged while leased: seen at its next handover

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.gather(*(worker(n) for n in range(6)))
        finally:
            stop = True
            await watcher
        _books(pool)
        assert peak <= 2
        assert min(sizes) >= 0 and max(sizes) <= 2, sizes
        assert pool.get_size() <= 2


async def _setup_on_retry(flavour: str, pg_dsn: str, app_name: str) -> tuple[int, bool]:
    seen: list[int] = []

    async def setup(con: Any) -> None:
        seen.append(con.get_server_pid())

    async with flagged_pool(flavour, pg_dsn, app_name, setup=setup) as (pool, flagged, made):
        async with pool.acquire() as con:
            pass
        flagged.update(id(raw) for raw in made)
        seen.clear()
        async with pool.acquire(timeout=10) as con:
            return len(seen), seen == [con.get_server_pid()]


async def test_setup_runs_once_on_the_retried_connection(pg_dsn: str, app_name: str) -> None:
    expected = await _setup_on_retry("asyncpg", pg_dsn, app_name)
    assert expected == (1, True)
    assert await _setup_on_retry("safepool", pg_dsn, app_name) == expected


async def test_lease_timeout_holds_on_the_retried_lease(pg_dsn: str, app_name: str) -> None:
    async with flagged_pool("safepool", pg_dsn, app_name) as (pool, flagged, made):
        async with pool.acquire() as con:
            pass
        flagged.update(id(raw) for raw in made)
        con = await pool.acquire(timeout=10, lease_timeout=0.3)
        await until(lambda: pool.stats().leases_expired == 1, 5)
        with pytest.raises(asyncpg.InterfaceError):
            await con.fetchval("SELECT 1")
        await pool.release(con)
        _books(pool)


async def test_retry_under_a_site_cap(pg_dsn: str, app_name: str) -> None:
    """max_site_share: the flagged lease's place at its site is given back
    before the retry, so the retry is not refused at the site's cap."""
    async with flagged_pool("safepool", pg_dsn, app_name, min_size=2, max_size=2, max_site_share=0.5) as (
        pool, flagged, made,
    ):
        async with pool.acquire(site="a") as con:
            pass
        async with pool.acquire(site="a") as con:
            pass
        flagged.update(id(raw) for raw in made)
        async with pool.acquire(timeout=5, site="a") as con:
            assert not con.is_closed()
        _books(pool)


async def test_retry_with_the_adaptive_queue(pg_dsn: str, app_name: str) -> None:
    async with flagged_pool("safepool", pg_dsn, app_name, min_size=2, max_size=2, queue_policy="adaptive") as (
        pool, flagged, made,
    ):
        held = await pool.acquire()
        async with pool.acquire() as con:
            pass
        flagged.update(id(raw) for raw in made if raw is not held._con)
        async with pool.acquire(timeout=5) as con:
            assert not con.is_closed()
        await pool.release(held)
        _books(pool)


@pytest.mark.parametrize("end", ["close", "terminate"])
async def test_pool_ends_during_the_retry(pg_dsn: str, app_name: str, server_count: Any, end: str) -> None:
    async with flagged_pool("safepool", pg_dsn, app_name, init=Slow(1.0)) as (pool, flagged, made):
        async with pool.acquire():
            pass
        flagged.update(id(raw) for raw in made)
        task = asyncio.ensure_future(pool.acquire(timeout=10))
        await asyncio.sleep(0.3)
        if end == "close":
            await asyncio.wait_for(pool.close(), 10)
        else:
            pool.terminate()
        with pytest.raises(asyncpg.InterfaceError):
            await asyncio.wait_for(task, 10)
        await until(lambda: True)
        async with asyncio.timeout(5):
            while await server_count(app_name):
                await asyncio.sleep(0.02)


async def test_is_closed_flips_back_after_the_handover(pg_dsn: str, app_name: str, server_count: Any) -> None:
    """An is_closed() True once (at the handover), False after: the
    connection is given up all the same, and closed; its backend gone."""
    made: list[Any] = []
    once: set[int] = set()

    class Flaky(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            if id(self) in once:
                once.discard(id(self))
                return True
            return super().is_closed()

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=Flaky,
                                      server_settings={"application_name": app_name})
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        once.update(id(raw) for raw in made)
        async with pool.acquire(timeout=10) as con:
            assert con.get_server_pid() != pid
        _books(pool)
        assert pool.get_size() == 1
        async with asyncio.timeout(5):
            while await server_count(app_name) > 1:
                await asyncio.sleep(0.02)
    finally:
        pool.terminate()
        _abort_all(made)


async def _flagged_then_raising(flavour: str, pg_dsn: str, app_name: str) -> list[str]:
    """A class whose ``is_closed()`` says True once for an idle connection
    (a health flag), then raises whenever asked again about it (its health
    record gone: a lookup that fails). Three acquires after the flag."""
    made: list[Any] = []
    looks: dict[int, int] = {}

    class FlaggedThenRaising(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def is_closed(self) -> bool:
            seen = looks.get(id(self))
            if seen is None:
                return super().is_closed()
            looks[id(self)] = seen + 1
            if seen == 0:
                return True
            raise RuntimeError("health record gone")

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(pg_dsn, min_size=1, max_size=1, connection_class=FlaggedThenRaising,
                         server_settings={"application_name": app_name})
    outcomes = []
    try:
        async with pool.acquire() as con:
            pass
        for raw in made:
            looks[id(raw)] = 0
        for _ in range(3):
            try:
                async with pool.acquire(timeout=3) as con:
                    await con.fetchval("SELECT 1")
                outcomes.append("acquired")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        return outcomes
    finally:
        with contextlib.suppress(Exception):  # (safepool's terminate() raises the class's error too)
            pool.terminate()
        looks.clear()
        _abort_all(made)


async def test_a_flagged_connection_whose_is_closed_then_raises(pg_dsn: str, app_name: str) -> None:
    """safepool gave the flagged connection up, then its close asked
    ``is_closed()`` unguarded: the Close failed and the place stayed counted
    for good, every later acquire timing out. Now it reads closed and is
    aborted, and the pool serves. asyncpg's pool opens a new connection on
    0.29-0.31 and serves; on 0.32 every later acquire raises the class's
    error (its holder asks the flagged connection again): neither times out."""
    theirs = await _flagged_then_raising("asyncpg", pg_dsn, app_name)
    assert "PoolTimeoutError" not in theirs and "TimeoutError" not in theirs
    assert await _flagged_then_raising("safepool", pg_dsn, app_name) == ["acquired"] * 3


@pytest.mark.parametrize("times", [1, 2])
async def test_waiter_cancelled_during_the_retry_after_a_hand_on(
    pg_dsn: str, app_name: str, server_count: Any, times: int,
) -> None:
    """The contended path: a waiting task is handed a released connection
    flagged on its way, gives it up, and is cancelled (once, twice) while
    the replacement connects (a slow init=). The books balance, the pool
    serves, never more than max_size backends."""
    async with flagged_pool("safepool", pg_dsn, app_name, init=Slow(1.0)) as (pool, flagged, made):
        con = await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire(timeout=10))
        await asyncio.sleep(0.05)
        await pool.release(con)
        flagged.update(id(raw) for raw in made)
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert await server_count(app_name) <= 1
        await cancelled(waiting, times)
        async with pool.acquire(timeout=10) as again:
            assert not again.is_closed()
            assert await again.fetchval("SELECT 1") == 1
            assert await server_count(app_name) == 1
        await until(lambda: pool.stats().in_use == 0)
        _books(pool)
        assert pool.get_size() == 1


async def _setup_fails_on_retry(flavour: str, pg_dsn: str, app_name: str) -> tuple[str, str]:
    calls = 0

    async def setup(con: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("setup failed")

    async with flagged_pool(flavour, pg_dsn, app_name, setup=setup) as (pool, flagged, made):
        async with pool.acquire() as con:
            pass
        flagged.update(id(raw) for raw in made)
        try:
            async with pool.acquire(timeout=10):
                first = "acquired"
        except RuntimeError as exc:
            first = str(exc)
        async with pool.acquire(timeout=10) as con:
            second = "acquired" if not con.is_closed() else "closed"
        if flavour == "safepool":
            await until(lambda: pool.stats().in_use == 0)
            _books(pool)
        return first, second


async def test_setup_failing_on_the_retried_connection(pg_dsn: str, app_name: str) -> None:
    expected = await _setup_fails_on_retry("asyncpg", pg_dsn, app_name)
    assert expected == ("setup failed", "acquired")
    assert await _setup_fails_on_retry("safepool", pg_dsn, app_name) == expected
