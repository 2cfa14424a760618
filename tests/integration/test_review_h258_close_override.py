"""Review h258: attacks on review h257's fix (a ``connection_class`` with a
``close()`` of its own waits for a cancel request under way; past
``max_inactive_connection_lifetime`` a class overriding ``close()`` or
``terminate()`` is terminated, as asyncpg's pool does).

Every wait is bounded (``asyncio.timeout`` / ``wait_for``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _internals
from tests._util import asyncpg_version, in_pg_sleep_on, outcome_of, until, watched_class
from tests.integration.test_review_h257_close_runs_statement import (
    LateProxy,
    audit_close_class,
    audit_table,
    audited,
    in_close_insert,
)

pytestmark = pytest.mark.asyncio


async def backends(admin: Any, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


# ---------------------------------------------------------------- overrides()


async def test_overrides_semantics() -> None:
    """``_pg.overrides``: a subclass of a subclass, a mixin, a class that
    re-binds asyncpg's own function, a class with only terminate()."""

    class Own(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, *, timeout: float | None = None) -> None:
            await super().close(timeout=timeout)

    class Grandchild(Own):
        pass

    class Mixin:
        async def close(self, *, timeout: float | None = None) -> None:
            await super().close(timeout=timeout)  # type: ignore[misc]

    class Mixed(Mixin, asyncpg.Connection):  # type: ignore[misc]
        pass

    class Rebound(asyncpg.Connection):  # type: ignore[misc]
        close = asyncpg.Connection.close

    class TermOnly(asyncpg.Connection):  # type: ignore[misc]
        def terminate(self) -> None:
            super().terminate()

    assert _internals.overrides(Own, "close")
    assert _internals.overrides(Grandchild, "close")
    assert _internals.overrides(Mixed, "close")
    assert not _internals.overrides(Rebound, "close")  # (asyncpg's own function: nothing of its own)
    assert not _internals.overrides(TermOnly, "close")
    assert _internals.overrides(TermOnly, "terminate")
    assert not _internals.overrides(asyncpg.Connection, "close")


# ------------------------------------------------------ idle expiry, terminate()


def raising_terminate_class(calls: list[int]) -> Any:
    class RaisingTerminate(asyncpg.Connection):  # type: ignore[misc]
        def terminate(self) -> None:
            calls.append(self.get_server_pid())
            raise RuntimeError("terminate() of its own failed")

    return RaisingTerminate


@pytest.mark.parametrize("flavour", [
    "asyncpg",
    "safepool",
])
async def test_inactive_lifetime_terminate_raises(pg_dsn: str, app_name: str, flavour: str) -> None:
    """A class whose terminate() raises, past the inactive lifetime: the
    pool must go on serving acquires and close within a bound."""
    calls: list[int] = []
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    admin = await asyncpg.connect(pg_dsn)
    pool = await create(
        pg_dsn, min_size=0, max_size=1, connection_class=raising_terminate_class(calls),
        max_inactive_connection_lifetime=0.1, server_settings={"application_name": app_name},
    )
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        await until(lambda: calls != [], 5)
        # The pool still serves: an acquire within a bound.
        async with pool.acquire(timeout=3) as again:
            assert await again.fetchval("SELECT 1") == 1
        await asyncio.wait_for(pool.close(), 5)
    finally:
        loop.set_exception_handler(previous)
        with contextlib.suppress(RuntimeError):  # (the class's own terminate())
            pool.terminate()
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await admin.close()
    assert calls[0] == pid
    # (asyncpg: the callback's error reaches the loop's handler; the pool goes on)
    assert any(isinstance(c.get("exception"), RuntimeError) for c in errors), errors


# ------------------------------------- a close waiting for a stalled request


async def _stalled_close(
    pg_dsn: str, app_name: str, proxy: LateProxy, admin: Any, table: str, *, expire: bool = True, **options: Any
) -> tuple[Any, Any, Any, asyncio.Future[Any], int]:
    """A max_size=1 pool of AuditClose through ``proxy``; the lease's 0.3 s
    statement runs in another task; the proxy holds every new connection
    (the pool's cancel request never arrives); expire_connections() (unless
    ``expire`` is False), then the lease's statement ends by itself. Returns
    (pool, cls, the connection, the call, its pid) with the release not yet
    begun."""
    cls = audit_close_class(table)
    pool = await safepool.create_pool(
        pg_dsn, host="127.0.0.1", port=proxy.port, ssl=False, min_size=0, max_size=1, connection_class=cls,
        server_settings={"application_name": app_name}, **options,
    )
    con = await pool.acquire()
    pid = con.get_server_pid()
    call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
    await in_pg_sleep_on(admin, pid, call=call)
    proxy.hold = True
    if expire:
        await pool.expire_connections()
    return pool, cls, con, call, pid


def _pending_pool_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()
            and "safepool" in repr(t.get_coro())]


async def test_terminate_while_the_close_waits_for_a_stalled_request(pg_dsn: str, app_name: str) -> None:
    """pool.terminate() while a release's close waits for a request that
    never arrives: the release ends at once, nothing of the pool's is left
    pending, the override is not called, the backend is gone."""
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        pool, cls, con, call, pid = await _stalled_close(pg_dsn, app_name, proxy, admin, table, reset_timeout=20)
        try:
            release = asyncio.ensure_future(outcome_of(pool.release(con, timeout=20), 25))
            assert await outcome_of(call, 5) == "done"
            await until(lambda: len(proxy.held) == 1, 5)  # (the request is written and held)
            assert not release.done()
            pool.terminate()
            released = await asyncio.wait_for(release, 3)
            assert not isinstance(released, TimeoutError), released
            for _ in range(5):
                await asyncio.sleep(0)
            assert _pending_pool_tasks() == []
            async with asyncio.timeout(5):
                while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                    await asyncio.sleep(0.01)
            assert cls.calls == [] and await audited(admin, table) == []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del con, call
                gc.collect()
            assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
        finally:
            pool.terminate()


async def test_small_release_timeout_with_a_stalled_request(pg_dsn: str, app_name: str) -> None:
    """release(timeout=0.5) on a class with a close() of its own, its
    request stalled: TimeoutError at about the budget (every asyncpg: a
    class's own close() gets the release's budget on 0.29-0.31 too, helper
    h279), the connection
    aborted, the place free again; the next acquire's backend never makes
    two on the server; no warning, no task left pending."""
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        pool, cls, con, call, pid = await _stalled_close(pg_dsn, app_name, proxy, admin, table, reset_timeout=0.5)
        loop = asyncio.get_running_loop()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                began = loop.time()
                released = await outcome_of(pool.release(con, timeout=0.5), 10)
                took = loop.time() - began
                assert isinstance(released, TimeoutError), released
                assert took < 2.5, took
                assert await outcome_of(call, 5) == "done"
                proxy.hold = False
                peak = 0
                async with pool.acquire(timeout=5) as again:
                    assert again.get_server_pid() != pid
                    peak = max(peak, await backends(admin, app_name))
                    assert await again.fetchval("SELECT 1") == 1
                assert peak == 1
                assert pool.get_size() == 1 and pool.get_idle_size() == 1
                await asyncio.wait_for(pool.close(), 5)
                gc.collect()
            assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
            assert pid not in [c["pid"] for c in cls.calls]  # (the aborted one's override never ran)
            assert _pending_pool_tasks() == []
        finally:
            pool.terminate()


# ------------------------------------------------ max_inactive_connection_lifetime


async def _until_no_backend(admin: Any, app_name: str, count: int = 0, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await backends(admin, app_name) != count:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_inactive_close_only_override(pg_dsn: str, app_name: str, flavour: str) -> None:
    """A class with a close() of its own only: past the lifetime, its
    close() is not called on either pool; the backend is gone."""
    closed: list[int] = []
    terminated: list[int] = []
    cls = watched_class(closed, terminated, close=True, terminate=False)
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    admin = await asyncpg.connect(pg_dsn)
    pool = await create(
        pg_dsn, min_size=0, max_size=1, connection_class=cls, max_inactive_connection_lifetime=0.1,
        server_settings={"application_name": app_name},
    )
    try:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
        await _until_no_backend(admin, app_name)
        await until(lambda: pool.get_size() == 0)
        assert closed == []
        await asyncio.wait_for(pool.close(), 5)
        assert closed == []
    finally:
        pool.terminate()
        await admin.close()


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_inactive_terminate_override_keeps_min_size(pg_dsn: str, app_name: str, flavour: str) -> None:
    """min_size=1, max_size=2, both connections idle past the lifetime: one
    terminated (the class's terminate()), the floor one kept; sizes agree."""
    if flavour == "asyncpg" and asyncpg_version() < (0, 32):
        pytest.skip("asyncpg < 0.32 terminates floor connections too (no min_size check)")
    closed: list[int] = []
    terminated: list[int] = []
    cls = watched_class(closed, terminated, close=True, terminate=True)
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    admin = await asyncpg.connect(pg_dsn)
    pool = await create(
        pg_dsn, min_size=1, max_size=2, connection_class=cls, max_inactive_connection_lifetime=0.1,
        server_settings={"application_name": app_name},
    )
    try:
        first = await pool.acquire()
        second = await pool.acquire()
        await pool.release(first)
        await pool.release(second)
        await until(lambda: terminated != [])
        await _until_no_backend(admin, app_name, 1)
        await until(lambda: pool.get_size() == 1)
        await asyncio.sleep(0.4)  # (a window for an absence: the floor one outlives its lifetime)
        assert len(terminated) == 1 and closed == []
        assert pool.get_size() == 1 and pool.get_idle_size() == 1
        assert await backends(admin, app_name) == 1
        await asyncio.wait_for(pool.close(), 5)
    finally:
        pool.terminate()
        await admin.close()


async def test_inactive_terminate_then_acquire_never_exceeds_max_size(pg_dsn: str, app_name: str) -> None:
    """max_size=1 of a class with its own terminate(): an acquire right as
    the idle one is terminated opens its replacement only once the old
    backend exited (safepool's backend_exit wait): never two backends."""
    closed: list[int] = []
    terminated: list[int] = []
    cls = watched_class(closed, terminated, close=False, terminate=True)
    admin = await asyncpg.connect(pg_dsn)
    sampler_admin = await asyncpg.connect(pg_dsn)
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await backends(sampler_admin, app_name))
            await asyncio.sleep(0.002)

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, connection_class=cls, max_inactive_connection_lifetime=0.05,
        server_settings={"application_name": app_name},
    )
    sampler = asyncio.ensure_future(sample())
    try:
        for round_ in range(6):
            # (each acquire after the first opens the replacement of the one
            # just terminated, whose backend still drops its temp table)
            async with pool.acquire(timeout=5) as con:
                await con.execute("CREATE TEMP TABLE t AS SELECT g FROM generate_series(1, 50000) g")
            await until(lambda n=round_ + 1: len(terminated) == n)
        assert closed == []
        await until(lambda: pool.get_size() == 0)
        await asyncio.wait_for(pool.close(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(sampler, 5)
        pool.terminate()
        await sampler_admin.close()
        await admin.close()
    assert peak <= 1, peak


@pytest.mark.parametrize("how", ["pool_close", "max_queries"])
async def test_no_budget_close_with_a_stalled_request_is_bounded(
    pg_dsn: str, app_name: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No budget anywhere (no reset_timeout, release() with no timeout):
    Pool.close() (or a max_queries release) meeting a stalled request on a
    class with a close() of its own is bounded by DEFAULT_RESET_TIMEOUT
    (patched to 1.5 s here; 30 s by default, where asyncpg's pool closes at
    once and the override's INSERT is refused). Then the connection is
    aborted, the override not called, the pool drained, no backend left."""
    from safepool import _workers

    monkeypatch.setattr(_workers, "DEFAULT_RESET_TIMEOUT", 1.5)
    loop = asyncio.get_running_loop()
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        pool, cls, con, call, pid = await _stalled_close(
            pg_dsn, app_name, proxy, admin, table, expire=False, **({"max_queries": 1} if how == "max_queries" else {})
        )
        try:
            began = loop.time()
            closing = asyncio.ensure_future(outcome_of(pool.close(), 10)) if how == "pool_close" else None
            released = await outcome_of(pool.release(con), 10)
            took = loop.time() - began
            if closing is not None:
                assert await closing is None
            assert await outcome_of(call, 5) == "done"
            assert len(proxy.held) == 1
            assert 1.0 < took < 4.0, (took, released)
            assert cls.calls == [] and await audited(admin, table) == []
            await _until_no_backend(admin, app_name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del con, call
                gc.collect()
            assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
            assert _pending_pool_tasks() == []
        finally:
            pool.terminate()


@pytest.mark.parametrize("then", [
    "terminate",
    "close",
])
async def test_inactive_terminate_then_pool_ends(pg_dsn: str, app_name: str, then: str) -> None:
    """Right after the class's terminate() at idle expiry, its backend held
    in its exit (an admin session locks the session's temp table, which the
    exiting backend drops), pool.terminate() or pool.close(): the class's
    terminate() has run once, close() never; the pool ends within a bound,
    nothing of the pool's left pending, no backend left."""
    closed: list[Any] = []
    terminated: list[Any] = []

    class Watched(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, *, timeout: float | None = None) -> None:
            closed.append(self)
            await super().close(timeout=timeout)

        def terminate(self) -> None:
            terminated.append(self)
            super().terminate()

    admin = await asyncpg.connect(pg_dsn)
    locker = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, connection_class=Watched, max_inactive_connection_lifetime=0.1,
        backend_exit_timeout=10, server_settings={"application_name": app_name},
    )
    try:
        async with pool.acquire() as con:
            raw = con._con if hasattr(con, "_con") else con
            await con.execute("CREATE TEMP TABLE t (g int)")
            schema = await con.fetchval("SELECT pg_my_temp_schema()::regnamespace::text")
        tr = locker.transaction()
        await tr.start()
        await locker.execute(f"LOCK TABLE {schema}.t IN ACCESS SHARE MODE")
        await until(lambda: terminated != [])
        locked = True
        try:
            if then == "terminate":
                pool.terminate()
                assert terminated == [raw] and closed == []
            else:
                closing = asyncio.ensure_future(outcome_of(pool.close(), 15))
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not closing.done()  # (the backend is still there: the place counts)
                await tr.rollback()
                locked = False
                assert await closing is None
                assert terminated == [raw] and closed == []
        finally:
            if locked:
                await tr.rollback()
        for _ in range(5):
            await asyncio.sleep(0)
        assert _pending_pool_tasks() == []
        assert pool.get_size() == 0
        await _until_no_backend(admin, app_name)
    finally:
        with contextlib.suppress(Exception):
            pool.terminate()
        await locker.close()
        await admin.close()


async def test_asyncpg_inactive_terminate_then_pool_terminate(pg_dsn: str, app_name: str) -> None:
    """asyncpg's pool on the same scenario: the class's terminate() runs
    once (at idle expiry); pool.terminate() does not call it again."""
    terminated: list[Any] = []

    class Watched(asyncpg.Connection):  # type: ignore[misc]
        def terminate(self) -> None:
            terminated.append(self)
            super().terminate()

    pool = await asyncpg.create_pool(
        pg_dsn, min_size=0, max_size=1, connection_class=Watched, max_inactive_connection_lifetime=0.1,
        server_settings={"application_name": app_name},
    )
    try:
        async with pool.acquire() as con:
            raw = con._con
        await until(lambda: terminated != [])
        pool.terminate()
        assert terminated == [raw]
    finally:
        pool.terminate()


async def test_release_timeout_bounds_a_stalled_request_without_reset_timeout(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release(timeout=0.5) of a class with a close() of its own, its
    request stalled, no reset_timeout on the pool: the release ends within
    about its timeout (0.32: TimeoutError)."""
    from safepool import _workers

    monkeypatch.setattr(_workers, "DEFAULT_RESET_TIMEOUT", 3.0)
    loop = asyncio.get_running_loop()
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        pool, cls, con, call, pid = await _stalled_close(pg_dsn, app_name, proxy, admin, table)
        try:
            began = loop.time()
            released = await outcome_of(pool.release(con, timeout=0.5), 10)
            took = loop.time() - began
            assert await outcome_of(call, 5) == "done"
            assert len(proxy.held) == 1
            assert took < 2.0, (took, released)
        finally:
            pool.terminate()


async def test_two_stalled_closes_and_pool_close(pg_dsn: str, app_name: str) -> None:
    """max_size=2, both leases released with a call running elsewhere and
    their requests stalled, pool.close() meanwhile (reset_timeout=1): all
    end within about the budget, never more than two backends, the
    overrides not called, nothing left on the server."""
    loop = asyncio.get_running_loop()
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        cls = audit_close_class(table)
        pool = await safepool.create_pool(
            pg_dsn, host="127.0.0.1", port=proxy.port, ssl=False, min_size=0, max_size=2, connection_class=cls,
            reset_timeout=1, server_settings={"application_name": app_name},
        )
        try:
            cons = [await pool.acquire(), await pool.acquire()]
            calls = [asyncio.ensure_future(c.fetchval("SELECT 'done' FROM pg_sleep(0.3)")) for c in cons]
            for c, call in zip(cons, calls, strict=True):
                await in_pg_sleep_on(admin, c.get_server_pid(), call=call)
            proxy.hold = True
            began = loop.time()
            closing = asyncio.ensure_future(outcome_of(pool.close(), 10))
            releases = [asyncio.ensure_future(outcome_of(pool.release(c), 10)) for c in cons]
            assert await backends(admin, app_name) <= 2
            outcomes = await asyncio.gather(*releases)
            assert await closing is None
            took = loop.time() - began
            assert [await outcome_of(call, 5) for call in calls] == ["done", "done"]
            assert len(proxy.held) == 2
            assert 0.8 < took < 3.0, (took, outcomes)
            assert cls.calls == [] and await audited(admin, table) == []
            assert pool.get_size() == 0
            await _until_no_backend(admin, app_name)
        finally:
            pool.terminate()


@pytest.mark.parametrize("how", ["max_queries", "plain"])
async def test_late_request_on_other_release_paths(pg_dsn: str, app_name: str, how: str) -> None:
    """h257's "late" scenario on other paths than an expired generation: a
    max_queries release (the class's close() follows) and a plain release
    (the connection is kept): the request held until the statement ended
    and HOLD_WINDOW more, then delivered. No statement of the override's
    or of the pool's (reset) runs while it is held, the override's INSERT
    lands, and the next lease's statement is not cancelled."""
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        pool, cls, con, call, pid = await _stalled_close(
            pg_dsn, app_name, proxy, admin, table, expire=False, **({"max_queries": 1} if how == "max_queries" else {})
        )
        try:
            release = asyncio.ensure_future(outcome_of(pool.release(con, timeout=5), 10))
            outcome = await outcome_of(call, 5)
            await until(lambda: len(proxy.held) == 1, 5)
            # Deliver once the override's INSERT runs, or once a window
            # passed without (h257's choreography).
            inserting = asyncio.ensure_future(in_close_insert(admin, pid))
            await asyncio.wait([inserting, release], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            insert_while_held = inserting.done() and not inserting.cancelled() and inserting.exception() is None
            inserting.cancel()
            await asyncio.gather(inserting, return_exceptions=True)
            proxy.hold = False
            await asyncio.wait_for(proxy.deliver(), 10)
            released = await release
            assert outcome == "done", outcome
            assert insert_while_held is False
            if how == "plain":
                # (the reset refused with the call in flight: the release
                # raises it, as asyncpg's; safepool then closes the
                # connection, calling the class's close(), where asyncpg's
                # pool terminates it: docs/migration.md, "A release whose
                # reset failed")
                assert isinstance(released, asyncpg.InterfaceError), released
            else:
                assert released is None, released
            await asyncio.wait_for(cls.ended.wait(), 10)
            assert [c["pid"] for c in cls.calls] == [pid] and "error" not in cls.calls[0], cls.calls
            assert await audited(admin, table) == [pid]
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 'next' FROM pg_sleep(0.2)") == "next"
        finally:
            pool.terminate()


@pytest.mark.parametrize("shape", ["mixin", "grandchild"])
async def test_inactive_close_override_by_mixin_or_grandchild(pg_dsn: str, app_name: str, shape: str) -> None:
    """The close() of a mixin, or of a parent class (the pool's class a
    subclass of it): past the lifetime, terminated (close() not called) on
    safepool as on asyncpg's pool."""
    closed: list[int] = []

    class Mixin:
        async def close(self, *, timeout: float | None = None) -> None:
            closed.append(self.get_server_pid())  # type: ignore[attr-defined]
            await super().close(timeout=timeout)  # type: ignore[misc]

    if shape == "mixin":
        cls: Any = type("Mixed", (Mixin, asyncpg.Connection), {})
    else:
        parent = type("Parent", (Mixin, asyncpg.Connection), {})
        cls = type("Grandchild", (parent,), {})
    admin = await asyncpg.connect(pg_dsn)
    pools = [
        await create(
            pg_dsn, min_size=0, max_size=1, connection_class=cls, max_inactive_connection_lifetime=0.1,
            server_settings={"application_name": app_name},
        )
        for create in (asyncpg.create_pool, safepool.create_pool)
    ]
    try:
        for pool in pools:
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1
        await _until_no_backend(admin, app_name)
        for pool in pools:
            await until(lambda p=pool: p.get_size() == 0)
        assert closed == []
    finally:
        for pool in pools:
            pool.terminate()
        await admin.close()
