"""What happens to a connection's session between leases."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool
from safepool import _internals as _pg
from tests._util import asyncpg_version, until_in_pg_sleep

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def make(pg_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    pools: list[safepool.Pool] = []

    async def factory(**kwargs: Any) -> safepool.Pool:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool._state.check_invariants()
        await asyncio.wait_for(pool.close(), 10)


async def test_lease_without_statements_skips_the_reset(make: Any) -> None:
    pool = await make()
    for _ in range(5):
        async with pool.acquire():
            pass
    stats = pool.stats()
    assert stats.resets_skipped == 5 and stats.resets == 0
    assert pool.get_idle_size() == 1  # handed back synchronously, no reset task


async def test_lease_with_a_statement_is_reset_before_release_returns(make: Any) -> None:
    pool = await make()
    async with pool.acquire() as con:
        await con.execute("SET statement_timeout = 1234")
    # As with asyncpg: release() returned after the reset, the connection is idle.
    stats = pool.stats()
    assert (stats.resetting, stats.idle, stats.resets) == (0, 1, 1)
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW statement_timeout") == "0"


async def test_full_mode_forwards_asyncpgs_own_coroutine_and_marks_the_lease(make: Any) -> None:
    """No wrapper coroutine per statement in the default mode: the proxy
    marks the lease for the reset when the call is made (so a statement that
    raises before asyncpg counts it is reset too: see the Parse tests)."""
    pool = await make()
    async with pool.acquire() as con:
        assert con._holder.clean_mark != -1
        statement = con.fetchval("SELECT 1")
        assert statement.cr_code is asyncpg.Connection.fetchval.__code__
        assert con._holder.clean_mark == -1
        assert await statement == 1
    assert pool.stats().resets == 1


async def test_setup_statements_count_as_the_leases(make: Any) -> None:
    async def setup(con: Any) -> None:
        await con.execute("SET search_path TO tenant_a")

    pool = await make(setup=setup)
    async with pool.acquire():
        pass  # no statement of its own; setup's SET must still be reset
    assert pool.stats().resets == 1


async def test_rollback_mode_only_ends_transactions(make: Any) -> None:
    pool = await make(reset_mode="rollback")
    async with pool.acquire() as con:
        await con.execute("SET statement_timeout = 1234")  # session state survives by design
        pid = con.get_server_pid()
    assert pool.stats().resets_skipped == 1
    async with pool.acquire() as con:
        assert con.get_server_pid() == pid
        assert await con.fetchval("SHOW statement_timeout") == "1234ms"
        await con.execute("BEGIN")
        await con.execute("CREATE TEMP TABLE rolled_back (a int)")
    async with pool.acquire() as con:
        assert not con.is_in_transaction()
        assert await con.fetchval("SELECT to_regclass('pg_temp.rolled_back')") is None


async def test_managed_transaction_left_by_an_exception_is_rolled_back(make: Any) -> None:
    pool = await make()
    with pytest.raises(ZeroDivisionError):
        async with pool.acquire() as con:
            async with con.transaction():
                await con.execute("CREATE TEMP TABLE gone (a int)")
                1 / 0  # noqa: B018
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT to_regclass('pg_temp.gone')") is None


async def test_failed_reset_replaces_the_connection(make: Any) -> None:
    async def broken_reset(con: Any) -> None:
        raise RuntimeError("reset hook failed")

    pool = await make(reset=broken_reset)
    # asyncpg raises the reset's error from release(), after closing the connection.
    with pytest.raises(RuntimeError, match="reset hook failed"):
        async with pool.acquire() as con:
            first = con.get_server_pid()
    with pytest.raises(RuntimeError, match="reset hook failed"):
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() != first
    assert pool.stats().resets_failed >= 1


async def test_listeners_are_dropped_even_without_a_reset(make: Any) -> None:
    pool = await make()
    seen: list[str] = []
    async with pool.acquire() as con:
        await con.add_listener("chan", lambda *args: seen.append(args[-1]))
        with pytest.warns(asyncpg.InterfaceWarning, match="active notification listener"):
            await pool.release(con)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0


@pytest.mark.parametrize("listen", ["notification", "log"])
async def test_listener_warning_raised_as_an_error_still_releases(make: Any, listen: str) -> None:
    # With warnings turned into errors (pytest's filterwarnings = error),
    # asyncpg's warning of listeners left registered raises from release():
    # asyncpg's pool then never gets the connection back, and safepool's kept
    # the lease open for good (the proxy detached, its listeners keeping it
    # from being reclaimed). The error is still raised, after the release.
    pool = await make()
    async with pool.acquire() as con:
        if listen == "notification":
            await con.add_listener("chan", lambda *args: None)
            await con.execute("SELECT 1")
        else:
            con.add_log_listener(lambda *args: None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(asyncpg.InterfaceWarning, match=f"active {listen} listener"):
                await pool.release(con)
    assert pool.stats().in_use == 0 and pool.leases() == []
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert not con._con._listeners and not con._con._log_listeners


# ------------------------------------ a Parse that no Sync followed
#
# asyncpg prepares a statement with Parse/Describe/Flush and counts it (the
# counter release reads) only when Bind/Execute/Sync follow. Whatever stops
# it in between leaves the backend 'active' in the implicit transaction the
# Parse opened, holding the parse-time locks (DDL on the table blocks). A
# release must end that before it returns, as asyncpg's reset query does.


async def _prepare_only(con: Any) -> None:
    await con.prepare("SELECT a FROM parse_only WHERE a = $1")


async def _bad_argument(con: Any) -> None:
    await con.fetch("SELECT a FROM parse_only WHERE a = $1", "not an int")  # fails to encode: DataError


async def _bad_argument_caught(con: Any) -> None:
    with pytest.raises(asyncpg.DataError):
        await _bad_argument(con)


async def _unencodable_object(con: Any) -> None:
    """An argument no codec takes, on a statement the connection has not
    prepared yet (so its Parse is sent first), caught inside the block."""
    with pytest.raises(asyncpg.DataError):
        await con.fetchval("SELECT a FROM parse_only WHERE a = $1::int", object())


class _PreparingConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection_class with a helper of its own: its prepare() runs on the
    connection itself, past the proxy's prepare()."""

    async def warm_up(self) -> None:
        await self.prepare("SELECT a FROM parse_only WHERE a = $1")


async def _class_helper_prepares(con: Any) -> None:
    await con.warm_up()


PARSE_ONLY = {
    "prepare": _prepare_only,
    "connection_class helper prepares": _class_helper_prepares,
    "bad argument, raised out of the block": _bad_argument,
    "bad argument, caught in the block": _bad_argument_caught,
    "unencodable object": _unencodable_object,
}


async def _log_queries(con: Any) -> None:
    con.add_query_logger(lambda record: None)


@pytest.mark.parametrize("logged", [False, True], ids=["", "query logger"])
@pytest.mark.parametrize("mode", ["full", "rollback", "auto"])
@pytest.mark.parametrize("case", list(PARSE_ONLY))
async def test_a_parse_left_without_sync_is_ended_by_release(
    make: Any, pg_dsn: str, case: str, mode: str, logged: bool
) -> None:
    # (logged: a query logger init= registers moves the reset to a pool
    # task, as asyncpg 0.30+ logs it; in rollback mode that reset sent no
    # ROLLBACK for the marked lease, and the Parse's locks stayed held.)
    if mode == "auto":
        pytest.importorskip("pglast")
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS parse_only (a int)")
        extra: dict[str, Any] = {"connection_class": _PreparingConnection} if "helper" in case else {}
        if logged:
            extra["init"] = _log_queries
        pool = await make(reset_mode=mode, statement_cache_size=0 if "caught" in case else 100, **extra)
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        try:
            async with pool.acquire() as con:
                await PARSE_ONLY[case](con)
        except asyncpg.DataError:
            assert case == "bad argument, raised out of the block"
        # When release() has returned: the session is idle, no lock is held.
        state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
        locks = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND relation = 'parse_only'::regclass", pid
        )
        assert (state, locks) == ("idle", 0)
        async with asyncio.timeout(5):  # DDL is not blocked
            await admin.execute("ALTER TABLE parse_only ADD COLUMN IF NOT EXISTS b int")
        async with pool.acquire() as con:  # and the connection serves the next lease
            assert await con.fetchval("SELECT count(*) FROM parse_only") == 0
    finally:
        await admin.close()


class _NoResetQuery(asyncpg.Connection):  # type: ignore[misc]
    """A connection class whose reset query is empty (as asyncpg builds for a
    server with none of the capabilities it resets)."""

    def get_reset_query(self) -> str:
        return ""

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return ""


async def test_an_empty_reset_query_sends_nothing_and_hands_the_connection_on(make: Any) -> None:
    # asyncpg's Connection.reset() executes the reset query only if it is not
    # empty: the session keeps its settings, and the release still completes.
    pool = await make(connection_class=_NoResetQuery)
    async with pool.acquire() as con:
        await con.execute("SET application_name = 'kept'")
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == "kept"
    stats = pool.stats()
    assert (stats.resets, stats.idle) == (2, 1)


class _DiscardTempAndRole(asyncpg.Connection):  # type: ignore[misc]
    """docs/reset-modes.md's recipe: asyncpg's reset query plus DISCARD TEMP and RESET ROLE."""

    def get_reset_query(self) -> str:
        return super().get_reset_query() + "\nDISCARD TEMP; RESET ROLE;"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return super()._get_reset_query() + "\nDISCARD TEMP; RESET ROLE;"


@pytest.mark.parametrize("logged", [False, True], ids=["", "query logger"])
@pytest.mark.parametrize("mode", ["full", "rollback", "auto"])
async def test_a_connection_class_reset_query_runs_in_every_mode(make: Any, mode: str, logged: bool) -> None:
    """A connection class's own reset query runs after every lease in every
    mode (docs/reset-modes.md). With a query logger on the connection the
    reset runs in a pool task, whose reset in rollback mode sent only what
    the mode sends (nothing here): the recipe's temporary table outlived
    the lease."""
    if mode == "auto":
        pytest.importorskip("pglast")
    pool = await make(reset_mode=mode, connection_class=_DiscardTempAndRole, init=_log_queries if logged else None)
    async with pool.acquire() as con:
        await con.execute("CREATE TEMP TABLE recipe_probe(a int)")
    async with pool.acquire(timeout=5) as con:
        assert await con.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname = 'recipe_probe' AND relnamespace = pg_my_temp_schema()"
        ) == 0


async def test_temp_tables_and_set_role_outlive_the_reset_as_on_asyncpg_and_the_recipe_ends_them(
    pg_dsn: str,
) -> None:
    # asyncpg's reset query does not undo a temporary table or SET ROLE;
    # neither does safepool's full reset (docs/reset-modes.md), and the
    # documented connection_class recipe undoes both.
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("DROP ROLE IF EXISTS reset_probe_role; CREATE ROLE reset_probe_role")
    seen = {}
    try:
        for name, create, cls in [
            ("asyncpg", asyncpg.create_pool, asyncpg.Connection),
            ("safepool", safepool.create_pool, asyncpg.Connection),
            ("safepool recipe", safepool.create_pool, _DiscardTempAndRole),
        ]:
            pool = await create(pg_dsn, min_size=1, max_size=1, connection_class=cls)
            try:
                async with pool.acquire() as con:
                    await con.execute("CREATE TEMP TABLE reset_probe(a int); SET ROLE reset_probe_role")
                async with pool.acquire() as con:
                    seen[name] = (
                        await con.fetchval(
                            "SELECT count(*) FROM pg_class WHERE relname = 'reset_probe'"
                            " AND relnamespace = pg_my_temp_schema()"
                        ),
                        await con.fetchval("SELECT current_user = 'reset_probe_role'"),
                    )
            finally:
                await pool.close()
    finally:
        await admin.execute("DROP ROLE reset_probe_role")
        await admin.close()
    assert seen == {"asyncpg": (1, True), "safepool": (1, True), "safepool recipe": (0, False)}


class _ClosedAfterUse(asyncpg.Connection):  # type: ignore[misc]
    """A connection class with an is_closed() of its own: it calls the
    connection closed once the application says so (a health flag)."""

    retired = False

    def is_closed(self) -> bool:
        return type(self).retired or super().is_closed()


async def test_a_connection_class_is_closed_is_asked_on_release_as_asyncpg_asks_it(pg_dsn: str) -> None:
    # The hot path reads asyncpg's is_closed() inline (two fields) but must
    # call an override, as asyncpg's release does: a connection the class
    # calls closed is given up and replaced, on both pools. (asyncpg 0.29 -
    # 0.31's own pool never replaces it: its next acquire waits for ever,
    # and so does its close(); checked on each. Only safepool runs there.)
    seen = {}
    pools = [("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool)]
    if asyncpg_version() < (0, 32):
        pools, seen = pools[1:], {"asyncpg": True}
    for name, create in pools:
        _ClosedAfterUse.retired = False
        pool = await create(pg_dsn, min_size=1, max_size=1, connection_class=_ClosedAfterUse)
        try:
            async with pool.acquire() as con:
                first = await con.fetchval("SELECT pg_backend_pid()")
                _ClosedAfterUse.retired = True
            _ClosedAfterUse.retired = False
            async with pool.acquire(timeout=5) as con:
                seen[name] = await con.fetchval("SELECT pg_backend_pid()") != first
                # The retired connection's socket was closed, so its backend
                # ends (on asyncpg < 0.32 safepool left it open: terminate()
                # asked the class's is_closed() whether to abort).
                async with asyncio.timeout(5):
                    while await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first):
                        await asyncio.sleep(0.005)
        finally:
            _ClosedAfterUse.retired = False
            await pool.close()
    assert seen == {"asyncpg": True, "safepool": True}


class _RecordingExecute(asyncpg.Connection):  # type: ignore[misc]
    """A connection class with an execute() of its own (a tracing wrapper)."""

    seen: list[str] = []

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        type(self).seen.append(query)
        return await super().execute(query, *args, timeout=timeout)


async def test_a_connection_class_execute_gets_the_reset_query_as_on_asyncpg(pg_dsn: str) -> None:
    # The hot path sends the reset through asyncpg's protocol, without
    # Connection.execute's frame, only where execute() is asyncpg's own:
    # asyncpg's reset calls self.execute(), and so must safepool's.
    seen = {}
    for name, create in [("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool)]:
        _RecordingExecute.seen = []
        pool = await create(pg_dsn, min_size=1, max_size=1, connection_class=_RecordingExecute)
        try:
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            seen[name] = [query for query in _RecordingExecute.seen if "RESET ALL" in query]
        finally:
            await pool.close()
    assert seen["safepool"] == seen["asyncpg"] and len(seen["asyncpg"]) == 1


class _ExecuteWithoutTimeout(asyncpg.Connection):  # type: ignore[misc]
    """An execute() of the class's own with no ``timeout`` keyword: asyncpg
    0.30+ calls ``self.execute(reset_query)`` (its timeout around the call)."""

    async def execute(self, query: str, *args: Any) -> str:
        return await super().execute(query, *args)


@pytest.mark.skipif(not _pg.RESET_UNDER_BUDGET, reason="asyncpg 0.29 passes timeout= to execute()")
@pytest.mark.parametrize("acquire_timeout", [None, 5.0], ids=["no-budget", "budget"])
async def test_a_class_execute_without_timeout_gets_the_reset_as_on_asyncpg(pg_dsn: str, acquire_timeout: Any) -> None:
    # asyncpg 0.30+ resets with self.execute(reset_query), its budget (the
    # release's timeout, by default the acquire's) around the call: a class
    # whose execute() takes no timeout works on both pools, with a budget or
    # without, and the connection stays (safepool resets such a class in a
    # pool task: the driver could only pass timeout=). It used to raise
    # TypeError after the lease had ended, and the slot stayed resetting
    # until the 30 s watchdog.
    seen = {}
    for name, create in [("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool)]:
        pool = await create(pg_dsn, min_size=1, max_size=1, connection_class=_ExecuteWithoutTimeout)
        try:
            async with pool.acquire(timeout=acquire_timeout) as con:
                await con.execute("SET application_name = 'dirty'")
                first = con.get_server_pid()
            async with pool.acquire(timeout=5) as con:
                seen[name] = (con.get_server_pid() == first, await con.fetchval("SHOW application_name"))
        finally:
            await pool.close()
    assert seen["safepool"] == seen["asyncpg"] and seen["asyncpg"][0] and seen["asyncpg"][1] != "dirty"


class _SlowReset(asyncpg.Connection):  # type: ignore[misc]
    """A reset that takes half a second (the documented connection_class recipe's shape)."""

    def get_reset_query(self) -> str:
        return super().get_reset_query() + "\nSELECT pg_sleep(0.5);"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return super()._get_reset_query() + "\nSELECT pg_sleep(0.5);"


@pytest.mark.realtime
@pytest.mark.skipif(not _pg.RESET_UNDER_BUDGET, reason="asyncpg 0.29 passes the budget to execute() in its place")
async def test_command_timeout_bounds_the_reset_under_a_longer_release_budget_as_on_asyncpg(pg_dsn: str) -> None:
    # asyncpg 0.30+: the release's budget (2 s here) is an outer timeout
    # and the reset's execute() keeps command_timeout (0.1 s): the first to
    # come ends it. Both pools raise TimeoutError and replace the connection.
    seen = {}
    for name, create in [("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool)]:
        pool = await create(pg_dsn, min_size=1, max_size=1, command_timeout=0.1, connection_class=_SlowReset)
        try:
            con = await pool.acquire()
            first = await con.fetchval("SELECT pg_backend_pid()")
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await pool.release(con, timeout=2)
                outcome = "ok"
            except Exception as exc:
                outcome = type(exc).__name__
            took = loop.time() - started
            con = await pool.acquire(timeout=5)  # (kept: every reset here times out)
            seen[name] = (outcome, took < 1.0, con.get_server_pid() != first)
        finally:
            pool.terminate()
    assert seen["safepool"] == seen["asyncpg"] == ("TimeoutError", True, True)


class _SleepingReset(asyncpg.Connection):  # type: ignore[misc]
    """A reset that sleeps 30 s on the server: only a cancel request ends it within a test."""

    def get_reset_query(self) -> str:
        return super().get_reset_query() + "\nSELECT pg_sleep(30);"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return super()._get_reset_query() + "\nSELECT pg_sleep(30);"


@pytest.mark.realtime
async def test_a_cancel_of_the_pool_task_finishing_a_reset_reaches_the_server(pg_dsn: str) -> None:
    """The releasing task drives the reset with asyncpg's done callback off
    the statement's waiter (no loop callback per release); cancelled, it
    hands the reset to a pool task with the callback back on. A cancel of
    that task (``asyncio.run()`` cancels every task as it ends) cancels the
    waiter, and the callback sends the server a cancel request, as when
    asyncpg's own task is cancelled: the backend stops sleeping at once,
    not in 30 s."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=_SleepingReset)
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        release = asyncio.ensure_future(pool.release(con))
        await until_in_pg_sleep(pg_dsn, pid)
        release.cancel()
        with pytest.raises(asyncio.CancelledError):
            await release
        [finishing] = pool._runner.tasks
        await asyncio.sleep(0)  # (its first step: it waits on the statement's waiter)
        finishing.cancel()
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) == "PgSleep":
                await asyncio.sleep(0.01)
    finally:
        await admin.close()
        pool.terminate()


@pytest.mark.parametrize(("budget", "per_lease"), [(None, 1), (5.0, 2)], ids=["no-budget", "release-budget"])
async def test_the_reset_leaves_asyncpgs_waiter_callback_off_unless_a_timer_needs_it(
    make: Any, monkeypatch: pytest.MonkeyPatch, budget: float | None, per_lease: int
) -> None:
    """asyncpg's protocol puts ``_on_waiter_completed`` on each statement's
    waiter; the loop runs it when the waiter is done. The reset a release
    drives with no timer leaves it off (one loop callback less per lease);
    with a budget, asyncpg's timer is on the statement and the callback,
    which cancels that timer, stays."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.BaseEventLoop):
        pytest.skip("counts asyncio's call_soon (uvloop's is not patchable)")
    pool = await make()
    scheduled: list[str] = []
    call_soon = loop.call_soon

    def counting(callback: Any, *args: Any, context: Any = None) -> Any:
        scheduled.append(getattr(callback, "__name__", ""))
        return call_soon(callback, *args, context=context)

    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")  # (its first run prepares: a waiter more)
    monkeypatch.setattr(loop, "call_soon", counting)
    for _ in range(10):
        async with pool.acquire(timeout=budget) as con:
            await con.fetchval("SELECT 1")
    monkeypatch.undo()
    assert scheduled.count("_on_waiter_completed") == 10 * per_lease


async def test_the_reset_is_on_its_way_when_aexit_returns_its_awaitable(make: Any, pg_dsn: str) -> None:
    """``async with pool.acquire()``'s exit sends the reset before the
    release's own bookkeeping, which then runs while the server works
    (docs/performance.md, "Send first, count after"): the server has it
    before anything awaits the exit. (``Pool.release()`` is a coroutine, as
    asyncpg's: nothing of it runs before it is awaited.) The lease's last
    statement and the reset are told apart in pg_stat_activity's ``query``,
    the last statement the backend received."""
    pool = await make()
    admin = await asyncpg.connect(pg_dsn)
    try:
        context = pool.acquire()
        con = await context.__aenter__()
        pid = await con.fetchval("SELECT pg_backend_pid() /* the lease's */")
        releasing = context.__aexit__(None, None, None)
        try:
            async with asyncio.timeout(5):
                while "pg_advisory_unlock_all" not in await admin.fetchval(
                    "SELECT query FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    await asyncio.sleep(0.005)
        finally:
            await releasing
        assert pool.get_idle_size() == 1
    finally:
        await admin.close()
