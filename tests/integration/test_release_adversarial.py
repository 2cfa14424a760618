"""A hostile user's release on a real PostgreSQL: ``__aexit__``'s result
(the reset's driver, or the resolved ``Leaser.released``) handled as asyncpg's
coroutine may be: given to ``create_task()`` or ``run_coroutine_threadsafe()``
(which accept only a coroutine), cancelled before its task ran, awaited twice.
Each compares with asyncpg's pool where asyncpg defines the behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import skip_before_asyncpg, until

pytestmark = pytest.mark.asyncio

ADVISORY = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """asyncpg's (and safepool's) report of a release inside BEGIN goes to
    the loop's exception handler: expected here, anything else is not."""
    loop = asyncio.get_running_loop()
    unexpected: list[dict[str, Any]] = []

    def handler(_: Any, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("Resetting connection with an active transaction"):
            unexpected.append(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(None)
    assert unexpected == []


async def _make(kind: str, dsn: str, app_name: str, **kwargs: Any) -> Any:
    module: Any = asyncpg if kind == "asyncpg" else safepool
    kwargs.setdefault("max_size", 1)
    return await module.create_pool(dsn, min_size=1, server_settings={"application_name": app_name}, **kwargs)


@contextlib.asynccontextmanager
async def _next_lease_on_a_new_backend(pool: Any, kind: str, pid: int) -> AsyncIterator[Any]:
    """The next lease after backend ``pid`` was given up: another backend,
    which answers; safepool's books balance once it is released."""
    async with pool.acquire(timeout=10) as again:
        assert again.get_server_pid() != pid
        assert await again.fetchval("SELECT 1") == 1
        yield again
    if kind == "safepool":
        pool._state.check_invariants()


async def _schedule(how: str, aw: Any) -> None:
    if how == "create_task":
        await asyncio.create_task(aw)
    else:
        loop = asyncio.get_running_loop()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(aw, loop))


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("how", ["create_task", "run_coroutine_threadsafe"])
@pytest.mark.parametrize("ran", [True, False], ids=["reset", "clean"])
async def test_aexit_scheduled_as_a_coroutine(pg_dsn: str, app_name: str, kind: str, how: str, ran: bool) -> None:
    """asyncpg's ``__aexit__`` is a coroutine: ``create_task(ctx.__aexit__(...))``
    releases. safepool's returned a driver (or a resolved future) that both
    refuse with TypeError, after the lease had ended: the reset never ran and
    its slot stayed RESETTING for good."""
    pool = await _make(kind, pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        if ran:
            await con.execute("SELECT pg_advisory_lock(1)")
        await _schedule(how, ctx.__aexit__(None, None, None))
        async with asyncio.timeout(5):  # (the only connection: back, reset)
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        if kind == "safepool":
            pool._state.check_invariants()
        pool.terminate()


async def test_release_task_cancelled_before_it_ran_still_resets(pg_dsn: str, app_name: str) -> None:
    """The task running the release's driver is cancelled before its first
    step: a coroutine would run nothing (asyncpg's lease then stays out for
    good), but safepool's lease has already ended, so the pool resets the
    connection and takes it back."""
    pool = await _make("safepool", pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        await con.execute("SELECT pg_advisory_lock(1)")
        task = asyncio.create_task(ctx.__aexit__(None, None, None))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
        pool._state.check_invariants()
    finally:
        pool.terminate()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
async def test_release_awaited_twice(pg_dsn: str, app_name: str, kind: str) -> None:
    """A second await of the same ``__aexit__`` result raises asyncpg's
    RuntimeError; safepool's driver re-ran the finished coroutine and
    reported the reset's end a second time (InternalStateError, or worse,
    for a slot another lease may hold by then)."""
    pool = await _make(kind, pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        await con.execute("SELECT pg_advisory_lock(1)")
        aw = ctx.__aexit__(None, None, None)
        await aw
        async with pool.acquire() as other:  # the slot is leased again meanwhile
            with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
                await aw
            assert await other.fetchval("SELECT 1") == 1
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        if kind == "safepool":
            pool._state.check_invariants()
        pool.terminate()


async def _storm(task: asyncio.Task[Any], after: int, mode: str) -> None:
    """Let ``task`` run ``after`` loop steps, then cancel it: once, twice in
    one step, or again at every step until it ends (anyio's re-delivery)."""
    for _ in range(after):
        await asyncio.sleep(0)
    task.cancel()
    if mode == "twice":
        task.cancel()
    while mode == "every_step" and not task.done():
        await asyncio.sleep(0)
        task.cancel()


async def _release_and_look(pool: Any, admin: Any, body_done: asyncio.Event, seen: list[int]) -> None:
    async with pool.acquire() as con:
        pid = con.get_server_pid()
        await con.execute("BEGIN; SELECT pg_advisory_lock(1); SET work_mem = '9MB'; LISTEN chan")
        body_done.set()
    # Returned: the reset is done, as another session sees it.
    seen.append(await admin.fetchval(ADVISORY + " AND pid = $1", pid))


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("mode", ["once", "twice", "every_step"])
async def test_release_cancelled_at_each_step(pg_dsn: str, app_name: str, kind: str, mode: str) -> None:
    """``async with`` exits with a transaction, an advisory lock, a LISTEN and
    a setting left, and its task is cancelled at each loop step of the
    release in turn. A release that returned leaves nothing another session
    can see; a cancelled one raises only CancelledError; afterwards both
    connections are back, reset, and the server sees at most max_size."""
    pool = await _make(kind, pg_dsn, app_name, max_size=2)
    admin = await asyncpg.connect(pg_dsn)
    outcomes: set[str] = set()
    try:
        # Cancel one step later each round, until a release gets through
        # before the cancel: every step of the release was cut once.
        for after in range(500):
            if "returned" in outcomes:
                break
            body_done = asyncio.Event()
            seen: list[int] = []
            with _quiet():
                task = asyncio.create_task(_release_and_look(pool, admin, body_done, seen))
                await body_done.wait()
                await _storm(task, after, mode)
                try:
                    await task
                    outcomes.add("returned")
                    assert seen == [0]
                except asyncio.CancelledError:
                    outcomes.add("cancelled")
            async with asyncio.timeout(5):
                a = await pool.acquire()
                b = await pool.acquire()
                for c in (a, b):
                    row = await c.fetchrow(
                        "SELECT current_setting('work_mem') AS wm, pg_current_xact_id_if_assigned() AS x,"
                        " (SELECT count(*) FROM pg_listening_channels()) AS listens")
                    assert dict(row) == {"wm": "4MB", "x": None, "listens": 0}
                assert await admin.fetchval(ADVISORY) == 0
                await pool.release(a)
                await pool.release(b)
            backends = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)
            assert backends <= 2
            assert (pool.get_size(), pool.get_idle_size()) == (2, 2)
            if kind == "safepool":
                pool._state.check_invariants()
        assert outcomes == {"cancelled", "returned"}
    finally:
        await admin.close()
        pool.terminate()


async def test_release_awaitable_dropped_unawaited_does_not_strand_the_slot(pg_dsn: str, app_name: str) -> None:
    """``ctx.__aexit__(...)`` called and its result dropped (a forgotten
    await): the pool must still get its connection back, reset."""
    pool = await _make("safepool", pg_dsn, app_name)
    try:
        ctx = pool.acquire()
        con = await ctx.__aenter__()
        await con.execute("SELECT pg_advisory_lock(1)")
        # Dropped on purpose: the pool runs the reset and warns, as Python
        # warns of a coroutine never awaited.
        with pytest.warns(RuntimeWarning, match="release was never awaited: the pool ran its reset"):
            ctx.__aexit__(None, None, None)
            gc.collect()
        async with asyncio.timeout(3):
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        pool._state.check_invariants()
    finally:
        pool.terminate()


@contextlib.asynccontextmanager
async def _leased(pool: Any) -> AsyncIterator[Any]:
    """A lease through an asynccontextmanager that releases in its
    ``finally:``. (A closed coroutine's GeneratorExit is thrown into this
    generator: its frame heads the traceback. The closing check took it for
    an async generator's aclose() and waited: Python raised "coroutine
    ignored GeneratorExit", and the reset stayed stranded while asyncpg's
    shield's task finished it.)"""
    con = await pool.acquire()
    try:
        yield con
    finally:
        await pool.release(con)


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("style", ["async_with", "finally_release", "asynccontextmanager"])
async def test_release_in_a_coroutine_being_closed(pg_dsn: str, app_name: str, kind: str, style: str) -> None:
    """A coroutine closed while it holds a lease (``coro.close()``, or its
    pending task garbage collected: "Task was destroyed but it is
    pending!") releases in its ``GeneratorExit`` path, where nothing can
    await: the release's first wait made Python raise "coroutine ignored
    GeneratorExit", and nothing drove the reset on: the slot stayed
    resetting until the garbage collector freed the frame (a cycle through
    the exception's traceback) or the reset watchdog aborted the
    connection 30 s later. asyncpg's pool finishes the reset in its
    shield's task; safepool's pool hands it to a pool task."""
    pool = await _make(kind, pg_dsn, app_name)
    tasks_kept: list[Any] = []
    try:
        started = asyncio.Event()

        async def holder() -> None:
            if style == "async_with":
                async with pool.acquire() as con:
                    await con.execute("SELECT pg_advisory_lock(1)")
                    started.set()
                    await asyncio.get_running_loop().create_future()
            elif style == "asynccontextmanager":
                async with _leased(pool) as con:
                    await con.execute("SELECT pg_advisory_lock(1)")
                    started.set()
                    await asyncio.get_running_loop().create_future()
            else:
                con = await pool.acquire()
                try:
                    await con.execute("SELECT pg_advisory_lock(1)")
                    started.set()
                    await asyncio.get_running_loop().create_future()
                finally:
                    await pool.release(con)

        coro = holder()
        task = asyncio.get_running_loop().create_task(coro)
        tasks_kept.append(task)  # left pending, as a destroyed task is
        await started.wait()
        # What the garbage collector does to a pending task's coroutine,
        # without waiting for it to run.
        try:
            coro.close()
        except RuntimeError as exc:
            # asyncpg's release awaits its shield: Python reports the wait
            # (its shield's task goes on); safepool's release does not wait.
            assert kind == "asyncpg" and "ignored GeneratorExit" in str(exc), exc
        else:
            assert kind == "safepool"
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        if kind == "safepool":
            pool._state.check_invariants()
    finally:
        pool.terminate()


async def _log_queries(con: Any) -> None:
    con.add_query_logger(lambda record: None)


async def _unlock_all(con: Any) -> None:
    await con.execute("SELECT pg_advisory_unlock_all()")


_RESETS_FAILED: list[int] = []


async def _failing_reset(con: Any) -> None:
    """Fails once (the closed coroutine's release), then unlocks."""
    if not _RESETS_FAILED:
        _RESETS_FAILED.append(con.get_server_pid())
        raise RuntimeError("reset hook failed")
    await _unlock_all(con)


@pytest.mark.parametrize("config", ["query logger", "reset= hook", "failing reset= hook"])
async def test_release_off_the_inline_path_in_a_coroutine_being_closed(
    pg_dsn: str, app_name: str, config: str
) -> None:
    """As above, where the release does not end in the inline reset: with a
    query logger (its loop pass after the reset) or a reset= hook (the
    reset in a pool task, whose end the release awaits). The release
    waited there, so Python raised "coroutine ignored GeneratorExit" out of
    the close (the reset went on in the pool's task, as on asyncpg's pool,
    which raises it too). Nothing waits now."""
    _RESETS_FAILED.clear()
    kwargs: dict[str, Any] = (
        {"init": _log_queries} if config == "query logger"
        else {"reset": _failing_reset if "failing" in config else _unlock_all}
    )
    pool = await _make("safepool", pg_dsn, app_name, **kwargs)
    tasks_kept: list[Any] = []
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        started = asyncio.Event()

        async def holder() -> None:
            async with pool.acquire() as con:
                await con.execute("SELECT pg_advisory_lock(1)")
                started.set()
                await asyncio.get_running_loop().create_future()

        coro = holder()
        tasks_kept.append(asyncio.get_running_loop().create_task(coro))
        await started.wait()
        coro.close()  # raised RuntimeError("coroutine ignored GeneratorExit")
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval(ADVISORY) == 0
        pool._state.check_invariants()
        gc.collect()
        # (A failed reset is the pool's to log: the release's future's error
        # was also reported, "Future exception was never retrieved".)
        assert reported == []
    finally:
        loop.set_exception_handler(None)
        pool.terminate()


async def test_statement_free_releases_in_coroutines_being_closed_never_wait(pg_dsn: str, app_name: str) -> None:
    """Forty coroutines each hold a lease that ran no statement, suspended,
    and are closed one after another: each release runs in a
    ``GeneratorExit`` path. Every 32nd release with nothing to wait for
    takes a loop pass (Leaser.pass_loop), and a wait there raised "coroutine
    ignored GeneratorExit" out of close(); in a coroutine being closed it
    returns at once instead, and every connection is back."""
    pool = await _make("safepool", pg_dsn, app_name)
    try:
        async def holder(started: asyncio.Event) -> None:
            async with pool.acquire():
                started.set()
                await asyncio.get_running_loop().create_future()

        for _ in range(40):
            started = asyncio.Event()
            coro = holder(started)
            task = asyncio.get_running_loop().create_task(coro)
            await started.wait()
            coro.close()  # (no RuntimeError)
            task.cancel()
            assert pool.get_idle_size() == 1
        pool._state.check_invariants()
    finally:
        pool.terminate()


async def test_release_in_an_async_generator_being_closed_is_waited_for(pg_dsn: str, app_name: str) -> None:
    """An async generator's ``aclose()`` (a consumer's early ``break``)
    releases in its ``GeneratorExit`` path too, but there a wait is allowed
    and awaited: the reset is done when ``aclose()`` returns, as on
    asyncpg's pool (unlike a closed coroutine's, above)."""
    pool = await _make("safepool", pg_dsn, app_name)
    admin = await asyncpg.connect(pg_dsn)
    try:
        async def rows() -> Any:
            async with pool.acquire() as con:
                await con.execute("SELECT pg_advisory_lock(1)")
                for n in range(10):
                    yield n

        async def wrapped_rows() -> Any:
            async with _leased(pool) as con:
                await con.execute("SELECT pg_advisory_lock(1)")
                for n in range(10):
                    yield n

        for stream in (rows(), wrapped_rows()):
            assert await stream.__anext__() == 0
            await stream.aclose()
            assert await admin.fetchval(ADVISORY) == 0  # reset before aclose() returned
            assert pool.stats().idle == 1
        pool._state.check_invariants()
    finally:
        await admin.close()
        pool.terminate()


_IN_FLIGHT = {
    # How the lease's statement runs in another task: asyncpg's simple-query
    # path (execute with no arguments), its extended one (arguments: the
    # statement section), and inside a transaction the release must end.
    "simple": "SELECT pg_sleep(10)",
    "extended": "SELECT pg_sleep($1)",
    "in a transaction": "SELECT pg_sleep(10)",
}


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("statement", list(_IN_FLIGHT))
@pytest.mark.parametrize("mode", ["full", "rollback"])
async def test_release_in_the_loop_step_that_cancels_the_leases_statement(
    pg_dsn: str, app_name: str, kind: str, statement: str, mode: str
) -> None:
    """A task runs a statement on the lease; another cancels that task and
    releases the connection in the same loop step. The cancel reaches
    asyncpg's protocol only in the next step (its waiter's done callback
    sends the cancel request); asyncpg's release decides there too (its
    shielded task's first step), finds the statement cancelling, waits for
    the server's answer and resets: release() returns and the connection
    is kept. safepool's release decided at once, found the protocol busy
    and closed the connection, raising ``InterfaceError: cannot perform
    operation: another operation is in progress``."""
    if kind == "asyncpg" and mode != "full":
        pytest.skip("reset_mode is safepool's")
    options: dict[str, Any] = {"server_settings": {"application_name": app_name}}
    if kind == "safepool":
        options["reset_mode"] = mode
    create = asyncpg.create_pool if kind == "asyncpg" else safepool.create_pool
    pool = await create(pg_dsn, min_size=1, max_size=1, **options)
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()

        async def run() -> None:
            if statement == "in a transaction":
                await con.execute("BEGIN")
            if statement == "extended":
                await con.execute(_IN_FLIGHT[statement], 10.0)
            else:
                await con.execute(_IN_FLIGHT[statement])

        task = asyncio.ensure_future(run())
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) != "PgSleep":
                await asyncio.sleep(0.005)
        task.cancel()
        with _quiet():
            await pool.release(con)  # (raises on the failure this test is about)
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.acquire(timeout=10) as again:
            assert again.get_server_pid() == pid  # the same connection, kept
            assert await again.fetchval("SELECT 1") == 1
            assert not again.is_in_transaction()
        assert await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "idle"
    finally:
        await admin.close()
        await pool.close()


_TRAPS_CANCEL = """CREATE FUNCTION pg_temp.traps_cancel(seconds float) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        PERFORM pg_sleep(60);
    EXCEPTION WHEN query_canceled THEN
        PERFORM pg_sleep(seconds);  -- the cancel is answered only after this
    END;
    RETURN 1;
END $$"""


class _SlowReset(asyncpg.Connection):  # type: ignore[misc]
    """The reset query starts with 0.6 s of server time."""

    def get_reset_query(self) -> str:
        return "SELECT pg_sleep(0.6); " + super().get_reset_query()

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return "SELECT pg_sleep(0.6); " + super()._get_reset_query()  # type: ignore[misc]


# What outlasts release(timeout=): (the trapped statement's seconds after
# the cancel, the connection class, the timeout, the bound on the release).
_OUTLASTING = {
    "the answer": (8.0, asyncpg.Connection, 0.5, 4.0),
    # The answer after 0.6 s, then a reset of 0.6 s: each within the 1 s
    # budget, both together not.
    "the reset after the answer": (0.6, _SlowReset, 1.0, 1.5),
}


@pytest.mark.realtime
@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("outlasting", list(_OUTLASTING))
async def test_release_timeout_bounds_the_wait_for_a_statement_cancelled_in_the_release_step(
    pg_dsn: str, app_name: str, kind: str, outlasting: str
) -> None:
    """As above, but the cancelled statement answers the cancel only
    later. asyncpg's release waits for it within release()'s own
    ``timeout=`` (it replaces the acquire's), and passes the reset what the
    wait left: TimeoutError, the connection is terminated, whether the
    answer or the reset after it outlasts the budget. safepool's retry (a
    loop step later) took the acquire's timeout (None here) and waited for
    the statement to end: release(timeout=0.5) blocked for as long as the
    server ran it; then (until 2026-12-04) it gave the reset a fresh
    budget after the wait: release(timeout=1) returned after 1.2 s."""
    seconds, connection_class, budget, bound = _OUTLASTING[outlasting]
    create = asyncpg.create_pool if kind == "asyncpg" else safepool.create_pool
    pool = await create(
        pg_dsn, min_size=1, max_size=1, connection_class=connection_class,
        server_settings={"application_name": app_name},
    )
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        await con.execute(_TRAPS_CANCEL)
        pid = con.get_server_pid()
        task = asyncio.ensure_future(con.fetchval("SELECT pg_temp.traps_cancel($1)", seconds))
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) != "PgSleep":
                await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        task.cancel()
        started = loop.time()
        with _quiet(), pytest.raises(TimeoutError):
            await pool.release(con, timeout=budget)
        assert loop.time() - started < bound
        with pytest.raises(asyncio.CancelledError):
            await task
        async with _next_lease_on_a_new_backend(pool, kind, pid):  # terminated, replaced
            pass
    finally:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        pool.terminate()


class _ResetsSearchPath(asyncpg.Connection):  # type: ignore[misc]
    def get_reset_query(self) -> str:
        return "RESET search_path"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return "RESET search_path"


@pytest.mark.parametrize("mode", ["rollback", "auto"])
async def test_own_reset_query_runs_after_a_release_in_the_step_that_cancels_the_statement(
    pg_dsn: str, app_name: str, mode: str
) -> None:
    """A connection class's own reset query runs after every lease, in
    every reset_mode (as asyncpg's pool runs it). Released in the loop step
    that cancels its running statement, the lease's reset, retried a loop
    step later, took the pool's hooks (rollback mode: no reset query) and
    sent a ROLLBACK alone: the next lease inherited the session's state."""
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset_mode=mode, connection_class=_ResetsSearchPath,
        server_settings={"application_name": app_name},
    )
    admin = await asyncpg.connect(pg_dsn)
    try:
        async with pool.acquire() as first:
            default = await first.fetchval("SHOW search_path")
        con = await pool.acquire()
        await con.execute("SET search_path TO pg_catalog")
        pid = con.get_server_pid()
        task = asyncio.ensure_future(con.execute("SELECT pg_sleep(10)"))
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) != "PgSleep":
                await asyncio.sleep(0.005)
        task.cancel()
        with _quiet():
            await pool.release(con)
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.acquire(timeout=10) as again:
            assert again.get_server_pid() == pid
            assert await again.fetchval("SHOW search_path") == default
        pool._state.check_invariants()  # type: ignore[attr-defined]
    finally:
        await admin.close()
        await pool.close()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("order", ["cancel, then release", "release, then cancel"])
async def test_the_order_of_release_and_cancel_in_one_loop_step_decides_as_on_asyncpg(
    pg_dsn: str, app_name: str, kind: str, order: str
) -> None:
    """asyncpg's release decides in its shielded task's first step, queued
    when release() is called; the cancel reaches the protocol in a callback
    queued when the query's task is cancelled. Whichever was queued first
    runs first: a cancel queued before the release is waited for (the
    connection is kept), one queued after it finds the protocol busy
    (``InterfaceError``, the connection replaced). safepool's retry task
    takes the same place in the queue."""
    create = asyncpg.create_pool if kind == "asyncpg" else safepool.create_pool
    pool = await create(pg_dsn, min_size=1, max_size=1, server_settings={"application_name": app_name})
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        task = asyncio.ensure_future(con.execute("SELECT pg_sleep(10)"))
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) != "PgSleep":
                await asyncio.sleep(0.005)
        if order == "cancel, then release":
            task.cancel()
            release = asyncio.ensure_future(pool.release(con))
        else:
            # release()'s first step, then the cancel, in the same loop pass
            # (the first step is where asyncpg's release queues its task).
            release = asyncio.ensure_future(pool.release(con))
            asyncio.get_running_loop().call_soon(task.cancel)
        try:
            await release
            outcome = "released"
        except asyncpg.InterfaceError as exc:
            assert "another operation is in progress" in str(exc)
            outcome = "InterfaceError"
        with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await task
        async with pool.acquire(timeout=10) as again:
            kept = again.get_server_pid() == pid
            assert await again.fetchval("SELECT 1") == 1
        expected = ("released", True) if order == "cancel, then release" else ("InterfaceError", False)
        assert (outcome, kept) == expected
    finally:
        await admin.close()
        await pool.close()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
async def test_release_while_another_tasks_statement_has_answered_unread(
    pg_dsn: str, app_name: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``release()`` while another task runs a statement on the lease (a
    program bug, docs/migration.md): the reset is refused ("another operation
    is in progress"), ``release()`` raises that and the connection is given
    up. Here the statement has already finished on the server, its answer
    unread (the transport paused), when the pool gives the connection up.
    asyncpg's pool terminates it: the statement fails with
    ``ConnectionDoesNotExistError``. safepool closed it with asyncpg's
    ``close()``, whose protocol cancels a running statement itself: the
    answer then came in its "cancelled" state and the statement failed with
    ``InternalClientError('got result for unknown protocol state 3')`` (14
    of 200 such releases on uvloop, 4 of 200 on asyncio, timed at random;
    helper-119). Now the close waits for the statement to end first (a
    cancel request to the server, as a take-back's; too late here), and the
    statement returns its result."""
    from tests._util import hook_cancel_requests

    cancelling = asyncio.Event()

    async def noted(pid: int) -> None:
        cancelling.set()

    hook_cancel_requests(monkeypatch, noted)
    pool = await _make(kind, pg_dsn, app_name)
    admin = await asyncpg.connect(pg_dsn)

    async def until(column: str, value: str) -> None:
        async with asyncio.timeout(10):
            while await admin.fetchval(f"SELECT {column} FROM pg_stat_activity WHERE pid = $1", pid) != value:
                await asyncio.sleep(0.005)

    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        transport = (con._con if kind == "asyncpg" else con._raw)._transport
        statement = asyncio.ensure_future(con.fetchval("SELECT 7 FROM pg_sleep(0.05)"))
        await until("wait_event", "PgSleep")
        transport.pause_reading()
        await until("state", "idle")  # (answered: the answer waits in the socket)
        release = asyncio.ensure_future(pool.release(con))
        if kind == "safepool":
            async with asyncio.timeout(10):
                await cancelling.wait()  # given up: the close is under way
        else:
            await asyncio.wait([release], timeout=10)  # (it terminates at once, and sends no cancel)
        transport.resume_reading()
        with pytest.raises(asyncpg.InterfaceError, match="another operation is in progress"):
            await asyncio.wait_for(release, 10)
        if kind == "asyncpg":
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await statement
        else:
            assert await asyncio.wait_for(statement, 10) == 7
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.005)
        async with _next_lease_on_a_new_backend(pool, kind, pid):
            pass
    finally:
        await admin.close()
        pool.terminate()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("timeout", [None, 5.0], ids=["no timeout", "timeout"])
@pytest.mark.parametrize("closes", ["max_queries", "expire_connections"])
async def test_release_closing_a_connection_whose_backend_was_killed_unread(
    pg_dsn: str, app_name: str, kind: str, timeout: float | None, closes: str
) -> None:
    """A release that closes its connection (``max_queries`` reached, or
    ``expire_connections()`` before it) while the backend has been killed
    and the client has not read its farewell (the transport paused: the kill
    landed in the loop iteration of the release), over a Unix socket: the
    close's Terminate message meets the closed socket, and asyncpg's
    ``Connection.close()`` raises the ``BrokenPipeError`` (its protocol's
    close lets only ``ConnectionResetError`` pass). asyncpg's pool raises it
    from ``release()`` with or without a timeout; safepool raises it when
    the release closes under a budget (a ``timeout=``: asyncpg 0.32's
    ``close(timeout=)``, whose error the release raises), and stays quiet
    without one, as it does for any error of a close asyncpg's pool runs
    with no budget (``_workers.close``). Either way the connection is given
    up, nothing leaks and the next lease gets a new backend (helper-119:
    both loops; over TCP the Terminate goes out and the close is quiet)."""
    import socket

    if kind == "asyncpg" or timeout is not None:
        # The reference is asyncpg 0.32's pool; before 0.32 safepool's
        # release closes under the pool's own bound (_pg.CLOSE_UNDER_BUDGET).
        skip_before_asyncpg((0, 32), "the reference pool, and a release that closes under its budget")
    options: dict[str, Any] = {"max_queries": 1} if closes == "max_queries" else {}
    pool = await _make(kind, pg_dsn, app_name, **options)
    admin = await asyncpg.connect(pg_dsn)
    try:
        con = await pool.acquire()
        transport = (con._con if kind == "asyncpg" else con._raw)._transport
        if transport.get_extra_info("socket").family != socket.AF_UNIX:
            pytest.skip("a Unix socket's write to a closed peer fails at once (EPIPE)")
        pid = con.get_server_pid()
        assert await con.fetchval("SELECT 1") == 1
        if closes == "expire_connections":
            await pool.expire_connections()
        transport.pause_reading()
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        raised: BaseException | None = None
        try:
            await asyncio.wait_for(pool.release(con, timeout=timeout), 10)
        except OSError as exc:
            raised = exc
        if kind == "asyncpg" or timeout is not None:
            assert isinstance(raised, BrokenPipeError), raised
        else:
            assert raised is None
        async with _next_lease_on_a_new_backend(pool, kind, pid):
            assert pool.get_size() == 1
            assert await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name) == 1
    finally:
        await admin.close()
        pool.terminate()


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
async def test_aexit_called_in_another_thread_for_run_coroutine_threadsafe(
    pg_dsn: str, app_name: str, kind: str
) -> None:
    """docs/migration.md: handing ``ctx.__aexit__(...)`` to
    ``run_coroutine_threadsafe()`` works on both pools. The call is made in
    the program's thread, not the loop's: asyncpg's coroutine runs nothing
    there, and neither does safepool's ``__aexit__`` now (it returns a
    coroutine that releases in the loop). It used to release at the call,
    in that thread: under the loop's debug mode (which checks the thread of
    call_soon) that raised RuntimeError after the lease ended, and the
    connection was lost (helper-108, 2026-12-04)."""
    import threading

    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(aw: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(aw, loop).result(10)

    async def check(pool: Any) -> int:
        async with asyncio.timeout(3):  # (the only connection: back, reset)
            async with pool.acquire() as again:
                return int(await again.fetchval(ADVISORY))

    async def terminate(pool: Any) -> None:
        pool.terminate()
        await until(lambda: pool.get_size() == 0)
        await asyncio.sleep(0)  # (the aborted transports' close: a loop callback)

    def body() -> int:
        pool = run(_make(kind, pg_dsn, app_name))
        try:
            ctx = pool.acquire()
            con = run(ctx.__aenter__())
            run(con.execute("SELECT pg_advisory_lock(1)"))
            run(con.execute("BEGIN"))
            run(ctx.__aexit__(None, None, None))  # (called here, run in the loop's thread)
            return run(check(pool))
        finally:
            run(terminate(pool))

    try:
        assert await asyncio.to_thread(body) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 5)
        loop.close()
