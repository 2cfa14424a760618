"""The cancellation matrix: every way a cancel arrives x every await point
of a lease's life, with the cancel point swept one loop step at a time.

Cancel forms: ``task.cancel()`` once, twice in one step, twice a step
apart; ``asyncio.timeout`` rescheduled to now; ``asyncio.wait_for``
(cancelled from outside: its inner task is cancelled and waited for); an
anyio ``CancelScope`` cancelled, or given a deadline of now; and
``anyio.move_on_after`` around code that awaits again in ``finally``
(anyio re-delivers the cancel at every await in the scope).

Await points: an acquire queued behind a held connection; an acquire
waiting for the connect the pool opens for it; the ``init=`` hook running
in that connect; the ``setup=`` hook; a query inside the lease; the
release's reset in flight (a ``reset=`` hook in a pool task, asyncpg's
reset query behind a lock, driven in the releasing task, or the wait for
a cancelled query that traps its cancel); ``close()`` waiting for a lease,
or for a connect under way; a lease whose connection
``expire_connections()`` expired; ``create_pool()`` opening min_size.
Lease bodies run as ``async with`` and, with ``SAFEPOOL_LONG=1``, as
acquire/``finally: release`` too.

Each point blocks on an Event (client side) or on an advisory lock the
test's admin session holds (server side) and is unblocked by the test.
The cancel comes k loop steps after the unblock, for k = 0, 1, ... until a
run ends before the cancel (so each step of the way out is cut once), or
the unblock k steps after the cancel (k < STEPS). After every run: the
core's invariants, the stats add up, the server sees exactly the pool's
backends (and never more than max_size, sampled all along), every
connection is handed out clean (no transaction, no LISTEN, no advisory
lock, no setting), and at the end no task is left and nothing reached the
loop's exception handler ("Task was destroyed but it is pending!",
"exception was never retrieved").

test_tiny_budgets (realtime) does the same with time-based forms and
budgets of 0 to 8 ms over whole leases, three tasks on two connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import pytest

import safepool
from safepool import _internals

from ._harness import LONG, loop_errors

pytestmark = pytest.mark.asyncio

STEPS = 12
MAX_SWEEP = 400
FORMS = [
    "cancel_once", "cancel_twice", "cancel_twice_spaced", "asyncio_timeout", "wait_for",
    "anyio_scope", "anyio_deadline", "anyio_move_on_finally",
]
ORDERS = ["unblock_then_cancel", "cancel_then_unblock"]
LOCK = 5900  # the advisory lock the admin session holds to block a point
DIRTY_LOCK = 5901  # a session lock a lease takes (the reset must release it)


def _expected_report(context: dict[str, Any]) -> bool:
    # asyncpg's (and safepool's) report of a lease released inside BEGIN.
    return str(context.get("message", "")).startswith("Resetting connection with an active transaction")


def _old_asyncpg_connect_cancelled(context: dict[str, Any]) -> bool:
    """asyncpg < 0.32's own report of a connect cancelled while it finishes
    (its future of the connection's first answer, left unretrieved once the
    connection closed): asyncpg's pool gives it when ``create_pool()`` is
    cancelled at the same point (review h234, side by side on 0.29)."""
    return (
        not _internals.HAS_POOL_HOLDER
        and context.get("message") == "Future exception was never retrieved"
        and isinstance(context.get("exception"), asyncpg.ConnectionDoesNotExistError)
    )


class Canceller:
    """Runs a body as the caller would under one cancel form; ``fire``
    delivers the cancel."""

    def __init__(self, form: str) -> None:
        self.form = form
        self.cm: Any = None
        self.scope: Any = None
        self.finally_awaits = 0

    async def run(self, body: Callable[[], Awaitable[Any]]) -> Any:
        form = self.form
        if form == "asyncio_timeout":
            async with asyncio.timeout(None) as cm:
                self.cm = cm
                return await body()
        if form == "wait_for":
            return await asyncio.wait_for(body(), 3600)
        if form in ("anyio_scope", "anyio_deadline"):
            with anyio.CancelScope() as scope:
                self.scope = scope
                return await body()
            return "scope cancelled"
        if form == "anyio_move_on_finally":
            with anyio.move_on_after(3600) as scope:
                self.scope = scope
                try:
                    return await body()
                finally:
                    # Code that awaits again on its way out: anyio cancels
                    # each of these awaits again.
                    for _ in range(3):
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.sleep(0)
                        self.finally_awaits += 1
            return "moved on"
        return await body()

    def fire(self, task: asyncio.Task[Any]) -> None:
        form = self.form
        loop = asyncio.get_running_loop()
        if form in ("cancel_once", "wait_for"):
            task.cancel()
        elif form == "cancel_twice":
            task.cancel()
            task.cancel()
        elif form == "cancel_twice_spaced":
            task.cancel()
            loop.call_soon(task.cancel)
        elif form == "asyncio_timeout":
            if self.cm is not None and not task.done():
                with contextlib.suppress(RuntimeError):  # (the body ended first: its timeout is finished)
                    self.cm.reschedule(loop.time())
        elif form == "anyio_scope":
            if self.scope is not None:
                self.scope.cancel()
        elif self.scope is not None:  # the anyio deadlines
            self.scope.deadline = anyio.current_time()


class Sampler:
    """Counts the pool's backends every few ms on a connection of its own."""

    def __init__(self, dsn: str, app_name: str) -> None:
        self.dsn, self.app_name = dsn, app_name
        self.seen: list[int] = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Sampler:
        self.con = await asyncpg.connect(self.dsn)
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self.stop.is_set():
            self.seen.append(int(await self.con.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self.app_name)))
            await asyncio.sleep(0.002)  # (a sampling interval: nothing to wait on)

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        await self.con.close()


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def _backends(admin: asyncpg.Connection, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


async def _wait_blocked_on_lock(admin: asyncpg.Connection, app_name: str) -> None:
    """Until a backend of the pool waits for the test's advisory lock."""
    async with asyncio.timeout(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND wait_event_type = 'Lock' AND wait_event = 'advisory'", app_name,
        ):
            await asyncio.sleep(0.001)


async def _dirty(con: Any) -> None:
    """Leave all a reset must undo: a setting, a LISTEN, a session advisory
    lock, an open transaction."""
    await con.execute("SET work_mem = '9MB'")
    await con.execute("LISTEN cancel_matrix")
    await con.execute(f"SELECT pg_advisory_lock({DIRTY_LOCK})")
    await con.execute("BEGIN")


async def _settle(pool: safepool.Pool) -> None:
    async with asyncio.timeout(10):
        while True:
            s = pool.stats()
            if not (s.in_use or s.connecting or s.resetting or s.closing or s.waiting):
                return
            await asyncio.sleep(0.001)


async def check_books(
    pool: safepool.Pool, admin: asyncpg.Connection, app_name: str, where: str, work_mem: str = "4MB"
) -> None:
    """The invariants after one run: books, server count, clean leases."""
    await _settle(pool)
    pool._state.check_invariants()
    s = pool.stats()
    assert s.size == s.idle + s.in_use + s.connecting + s.resetting + s.closing, (where, s)
    assert s.size <= s.max_size, (where, s)
    async with asyncio.timeout(10):  # a backend takes a moment to leave pg_stat_activity
        while (seen := await _backends(admin, app_name)) != pool.get_size():
            await asyncio.sleep(0.002)
    assert seen == pool.get_size(), where
    # Every connection is handed out clean (and at least one is served).
    async with asyncio.timeout(10):
        cons = [await pool.acquire() for _ in range(max(1, pool.get_size()))]
        try:
            for con in cons:
                row = await con.fetchrow(
                    "SELECT current_setting('work_mem') AS wm, pg_current_xact_id_if_assigned() AS x,"
                    " (SELECT count(*) FROM pg_listening_channels()) AS listens,"
                    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks"
                )
                assert not con.is_in_transaction(), where
                assert dict(row) == {"wm": work_mem, "x": None, "listens": 0, "locks": 0}, (where, dict(row))
        finally:
            for con in cons:
                await pool.release(con)
    await _settle(pool)
    pool._state.check_invariants()


@dataclass
class Run:
    """One run of a cell: the task under test and what the point needs."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    """An await point: the pool it needs, the body the cancelled task runs,
    how the test unblocks it, and what it does after the run."""

    options: Callable[[Run], dict[str, Any]]
    body: Callable[[safepool.Pool, Run, str], Awaitable[Any]]
    before: Callable[[safepool.Pool, Run], Awaitable[None]] | None = None
    reached: Callable[[safepool.Pool, Run, asyncpg.Connection, str], Awaitable[None]] | None = None
    unblock: Callable[[safepool.Pool, Run, asyncpg.Connection], Awaitable[None]] | None = None
    after: Callable[[safepool.Pool, Run], Awaitable[None]] | None = None
    server_lock: bool = False  # the point blocks on the admin's advisory lock
    fresh_connect: bool = False  # each run needs a new connection (min_size=0, expired after)


async def _gate_or_lock(con: Any, run: Run, server: bool) -> None:
    run.reached.set()
    if server:
        await con.execute(f"SELECT pg_advisory_lock({LOCK}); SELECT pg_advisory_unlock({LOCK})")
    else:
        await run.gate.wait()


async def _lease(pool: safepool.Pool, run: Run, style: str, inside: Callable[[Any], Awaitable[None]]) -> str:
    if style == "async_with":
        async with pool.acquire() as con:
            await inside(con)
        return "released"
    con = await pool.acquire()
    try:
        await inside(con)
    finally:
        await pool.release(con)
    return "released"


# -- queue: an acquire queued behind the one connection, held by the test
async def _queue_before(pool: safepool.Pool, run: Run) -> None:
    run.extra["holder"] = await pool.acquire()


async def _queue_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    return await _lease(pool, run, style, _dirty)


async def _queue_reached(pool: safepool.Pool, run: Run, admin: asyncpg.Connection, app: str) -> None:
    await _until(lambda: pool.stats().waiting == 1)


async def _queue_unblock(pool: safepool.Pool, run: Run, admin: asyncpg.Connection) -> None:
    await pool.release(run.extra.pop("holder"))


# -- connect: an acquire waiting for the connect the pool opens for it
def _connect_options(run_box: Run) -> dict[str, Any]:
    async def connect(*args: Any, **kwargs: Any) -> Any:
        run = run_box.extra["current"]
        run.reached.set()
        await run.gate.wait()
        return await asyncpg.connect(*args, **kwargs)

    return {"connect": connect}


async def _connect_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    return await _lease(pool, run, style, _dirty)


def _hook_options(hook: str, statement: str) -> Callable[[bool], Callable[[Run], dict[str, Any]]]:
    """The pool options of a point blocked in the ``hook`` (``init`` or
    ``setup``), which runs ``statement`` first, then waits for the gate or
    the server lock."""

    def for_gate(server: bool) -> Callable[[Run], dict[str, Any]]:
        def options(run_box: Run) -> dict[str, Any]:
            async def blocked_hook(con: Any) -> None:
                await con.execute(statement)
                await _gate_or_lock(con, run_box.extra["current"], server)

            return {hook: blocked_hook}

        return options

    return for_gate


# -- init: the init= hook runs in the connect the acquire waits for
_init_options = _hook_options("init", "SELECT 1")
# -- setup: the setup= hook runs in the acquiring task
_setup_options = _hook_options("setup", "SET work_mem = '7MB'")


# -- query: a query inside the lease
def _query_body(server: bool) -> Callable[[safepool.Pool, Run, str], Awaitable[Any]]:
    async def body(pool: safepool.Pool, run: Run, style: str) -> Any:
        async def inside(con: Any) -> None:
            await _dirty(con)
            await _gate_or_lock(con, run, server)

        return await _lease(pool, run, style, inside)

    return body


# -- reset: the release's reset in flight (a reset= hook that blocks)
def _reset_options(server: bool) -> Callable[[Run], dict[str, Any]]:
    def options(run_box: Run) -> dict[str, Any]:
        async def reset(con: Any) -> None:
            await _gate_or_lock(con, run_box.extra["current"], server)
            await con.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL")

        return {"reset": reset}

    return options


async def _reset_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    return await _lease(pool, run, style, _dirty)


# -- reset query: the hot path's reset (driven in the releasing task) blocks
class BlockingResetQuery(asyncpg.Connection):
    """asyncpg's reset query behind a wait for the test's advisory lock."""

    if hasattr(asyncpg.Connection, "get_reset_query"):

        def get_reset_query(self) -> str:
            return f"SELECT pg_advisory_lock({LOCK}); SELECT pg_advisory_unlock({LOCK});\n" + super().get_reset_query()

    else:  # asyncpg 0.29: the method's private name

        def _get_reset_query(self) -> str:
            return f"SELECT pg_advisory_lock({LOCK}); SELECT pg_advisory_unlock({LOCK});\n" + super()._get_reset_query()


async def _reset_query_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    async def inside(con: Any) -> None:
        await _dirty(con)
        run.reached.set()  # the release follows: its reset waits for the lock

    return await _lease(pool, run, style, inside)


# -- cancelled query: the default reset waits for a query that traps its cancel
TRAPS_CANCEL = (
    "DO $$ BEGIN PERFORM pg_sleep(60); EXCEPTION WHEN query_canceled THEN "
    f"PERFORM pg_advisory_lock({LOCK}); PERFORM pg_advisory_unlock({LOCK}); END $$"
)


async def _trapped_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    async def inside(con: Any) -> None:
        await _dirty(con)
        query = asyncio.ensure_future(con.execute(TRAPS_CANCEL))
        await run.extra["query_running"].wait()  # (the test sees it on the server)
        query.cancel()  # asyncpg sends the cancel; the query traps it and waits for the lock
        with contextlib.suppress(asyncio.CancelledError, asyncpg.QueryCanceledError):
            await query
        run.reached.set()  # the release follows: it must wait for the query

    return await _lease(pool, run, style, inside)


async def _trapped_before(pool: safepool.Pool, run: Run) -> None:
    run.extra["query_running"] = asyncio.Event()


async def _trapped_reached(pool: safepool.Pool, run: Run, admin: asyncpg.Connection, app: str) -> None:
    async with asyncio.timeout(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            # Inside pg_sleep, so inside the block that traps the cancel: a
            # cancel that came as the statement started (state 'active',
            # not yet in the block) failed it untrapped, and nothing ever
            # waited for the lock (CI, once under load).
            " AND state = 'active' AND query LIKE 'DO %' AND wait_event = 'PgSleep'", app,
        ):
            await asyncio.sleep(0.001)
    run.extra["query_running"].set()
    await asyncio.wait_for(run.reached.wait(), 10)


# -- close(): waits for a lease the test holds
async def _close_before(pool: safepool.Pool, run: Run) -> None:
    con = await pool.acquire()
    await _dirty(con)
    run.extra["holder"] = con


async def _close_body(pool: safepool.Pool, run: Run, style: str) -> Any:
    run.reached.set()
    await pool.close()
    return "closed"


async def _close_reached(pool: safepool.Pool, run: Run, admin: asyncpg.Connection, app: str) -> None:
    await run.reached.wait()
    await _until(lambda: pool.is_closing())


async def _close_unblock(pool: safepool.Pool, run: Run, admin: asyncpg.Connection) -> None:
    holder = run.extra.pop("holder")
    # Terminated by the cancelled close() first (InterfaceError), or while
    # this release's reset ran (its statement's error, as asyncpg's release
    # raises it: unblocked before the close task saw its cancel).
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError):
        await pool.release(holder)


# -- close(): gives a connect under way (its init= hook blocked) a grace
async def _close_connect_before(pool: safepool.Pool, run: Run) -> None:
    await pool.expire_connections()  # (no idle connection: the acquire below connects)
    await _until(lambda: pool.get_size() == 0)
    run.extra["acquirer"] = asyncio.create_task(pool.fetchval("SELECT 1"))


async def _close_connect_reached(pool: safepool.Pool, run: Run, admin: asyncpg.Connection, app: str) -> None:
    await _wait_blocked_on_lock(admin, app)  # the init= hook waits
    await _until(lambda: pool.is_closing())


async def _close_connect_after(pool: safepool.Pool, run: Run) -> None:
    with contextlib.suppress(safepool.PoolClosedError):
        await asyncio.wait_for(run.extra.pop("acquirer"), 10)


# -- expire: expire_connections() while a lease runs a query
async def _expire_reached(pool: safepool.Pool, run: Run, admin: asyncpg.Connection, app: str) -> None:
    await run.reached.wait()
    run.extra["pids"] = set(await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app))
    await pool.expire_connections()


async def _expire_after(pool: safepool.Pool, run: Run) -> None:
    await _settle(pool)


_POLICIES: dict[str, Any] = {"max_site_share": 0.5, "queue_policy": "adaptive", "max_waiters": 4, "fail_fast": True}

POINTS: dict[str, Point] = {
    "queue": Point(options=lambda run: {}, before=_queue_before, body=_queue_body, reached=_queue_reached,
                   unblock=_queue_unblock),
    "connect": Point(options=_connect_options, body=_connect_body, fresh_connect=True),
    # The same two waits with every overload policy on: the waiter is held
    # by a bulkhead's books and the adaptive queue (max_waiters too).
    "queue_policies": Point(options=lambda run: dict(_POLICIES), before=_queue_before, body=_queue_body,
                            reached=_queue_reached, unblock=_queue_unblock),
    "connect_policies": Point(options=lambda run: {**_connect_options(run), **_POLICIES}, body=_connect_body,
                              fresh_connect=True),
    "init_event": Point(options=_init_options(False), body=_connect_body, fresh_connect=True),
    "init_lock": Point(options=_init_options(True), body=_connect_body, fresh_connect=True, server_lock=True),
    "setup_event": Point(options=_setup_options(False), body=_connect_body),
    "setup_lock": Point(options=_setup_options(True), body=_connect_body, server_lock=True),
    # (with an acquire timeout the hook runs under the pool's timer: run_setup_until)
    "setup_lock_acquire_timeout": Point(options=lambda run: {**_setup_options(True)(run), "acquire_timeout": 3600},
                                        body=_connect_body, server_lock=True),
    "query_event": Point(options=lambda run: {}, body=_query_body(False)),
    "query_lock": Point(options=lambda run: {}, body=_query_body(True), server_lock=True),
    "reset_hook_event": Point(options=_reset_options(False), body=_reset_body),
    "reset_hook_lock": Point(options=_reset_options(True), body=_reset_body, server_lock=True),
    "reset_waits_for_cancelled_query": Point(
        options=lambda run: {}, before=_trapped_before, body=_trapped_body, reached=_trapped_reached, server_lock=True),
    "close_waiting_for_lease": Point(options=lambda run: {}, before=_close_before, body=_close_body,
                                     reached=_close_reached, unblock=_close_unblock),
    "reset_query_lock": Point(options=lambda run: {"connection_class": BlockingResetQuery}, body=_reset_query_body,
                              server_lock=True),
    "close_during_connect": Point(options=_init_options(True), before=_close_connect_before, body=_close_body,
                                  reached=_close_connect_reached, after=_close_connect_after, server_lock=True,
                                  fresh_connect=True),
    "expire_during_query": Point(options=lambda run: {}, body=_query_body(False), reached=_expire_reached,
                                 after=_expire_after),
}


@contextlib.asynccontextmanager
async def _admin(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    admin = await asyncpg.connect(pg_dsn)
    try:
        yield admin
    finally:
        await admin.execute("SELECT pg_advisory_unlock_all()")
        await admin.close()


async def run_cell(pg_dsn: str, app_name: str, point_name: str, form: str, order: str, style: str) -> list[str]:
    """Every k of the sweep on one pool; returns the outcomes seen."""
    point = POINTS[point_name]
    closing = point_name.startswith("close")
    box = Run()
    max_size = 2
    outcomes: list[str] = []
    pool: safepool.Pool | None = None

    async def new_pool() -> safepool.Pool:
        return await safepool.create_pool(
            pg_dsn, min_size=0 if point.fresh_connect else 1, max_size=1 if point_name.startswith("queue") else max_size,
            server_settings={"application_name": app_name}, **point.options(box),
        )

    async with _admin(pg_dsn) as admin, Sampler(pg_dsn, app_name) as sampler:
        with loop_errors(allow=_expected_report) as unhandled:
            try:
                order_k = -1
                while True:
                    # Unblock first: one step later each run until a run ends
                    # before the cancel (every step of the way out was cut
                    # once). Cancel first: the unblock STEPS steps late at most.
                    order_k += 1
                    if order_k >= (STEPS if order == "cancel_then_unblock" else MAX_SWEEP):
                        break
                    if order == "unblock_then_cancel" and outcomes and outcomes[-1] in ("released", "closed"):
                        break
                    where = f"{point_name}/{form}/{order}/{style}/k={order_k}"
                    if pool is None or closing:
                        pool = await new_pool()
                    run = Run()
                    box.extra["current"] = run
                    if point.server_lock:
                        await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
                    if point.before is not None:
                        await point.before(pool, run)
                    canceller = Canceller(form)
                    task = asyncio.create_task(
                        canceller.run(lambda p=pool, r=run, b=point.body: b(p, r, style)))
                    if point.reached is not None:
                        await point.reached(pool, run, admin, app_name)
                    else:
                        await asyncio.wait_for(run.reached.wait(), 10)
                    if point.server_lock:
                        await _wait_blocked_on_lock(admin, app_name)

                    async def unblock(p: safepool.Pool = pool, r: Run = run) -> None:
                        if point.unblock is not None:
                            await point.unblock(p, r, admin)
                        elif point.server_lock:
                            await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
                        else:
                            r.gate.set()

                    if order == "unblock_then_cancel":
                        await unblock()
                        await _steps(order_k)
                        canceller.fire(task)
                    else:
                        canceller.fire(task)
                        await _steps(order_k)
                        await unblock()
                    try:
                        async with asyncio.timeout(15):
                            outcomes.append(str(await task))
                    except (asyncio.CancelledError, TimeoutError) as exc:
                        if not task.done():
                            raise AssertionError(f"{where}: the cancelled task hangs") from exc
                        outcomes.append(type(exc).__name__)
                    if point.after is not None:
                        await point.after(pool, run)
                    if closing:
                        async with asyncio.timeout(10):
                            while await _backends(admin, app_name):
                                await asyncio.sleep(0.002)
                        assert pool.get_size() == 0, (where, pool)
                        pool._state.check_invariants()
                        with pytest.raises(safepool.PoolClosedError):
                            await pool.acquire()
                        continue
                    # (a setup= hook's SET is the new lease's own)
                    await check_books(pool, admin, app_name, where, "7MB" if point_name.startswith("setup") else "4MB")
                    if "pids" in run.extra:
                        # expire_connections(): no connection of before is handed out again.
                        now = {r["pid"] for r in await admin.fetch(
                            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app_name)}
                        old = {r["pid"] for r in run.extra["pids"]}
                        assert not (now & old), (where, now, old)
                    if point.fresh_connect:
                        await pool.expire_connections()
                        await _until(lambda p=pool: p.get_size() == 0)
            finally:
                if pool is not None:
                    await asyncio.wait_for(pool.close(), 10)
                gc.collect()
                await asyncio.sleep(0)
            assert pool is not None and not pool._runner.tasks, pool
            leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t is not sampler.task]
            assert not leftover, leftover
            assert not unhandled, unhandled
    assert sampler.seen and max(sampler.seen) <= max_size, f"backends seen: max {max(sampler.seen)} > {max_size}"
    return outcomes


_STYLES = {
    "queue", "connect", "queue_policies", "connect_policies", "query_event", "query_lock", "reset_hook_event", "reset_query_lock",
    "reset_waits_for_cancelled_query",
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("point", list(POINTS))
async def test_cancel_matrix(pg_dsn: str, app_name: str, point: str, form: str, order: str) -> None:
    # acquire/finally release as well under SAFEPOOL_LONG (it doubles the
    # points' time; the lease's release path is the same as async with's).
    styles = ["async_with", "try_finally"] if LONG and point in _STYLES else ["async_with"]
    seen: set[str] = set()
    for style in styles:
        seen.update(o.split(":")[0] for o in await run_cell(pg_dsn, app_name + style[0], point, form, order, style))
    assert seen, seen
    print(f"OUTCOMES {point} {form} {order}: {sorted(seen)}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gate", ["event", "lock"])
async def test_cancel_pool_start(pg_dsn: str, app_name: str, form: str, order: str, gate: str) -> None:
    """``create_pool()`` cancelled while it opens min_size connections (the
    first awaited in the caller's task, the rest gathered), their init=
    hooks blocked: the pool ends closed, every backend it opened goes, no
    task is left behind, nothing reaches the loop's exception handler."""
    outcomes: set[str] = set()
    async with _admin(pg_dsn) as admin:
        with loop_errors(allow=_old_asyncpg_connect_cancelled) as unhandled:
            k = -1
            while True:
                k += 1
                if k >= (STEPS if order == "cancel_then_unblock" else MAX_SWEEP) or "created" in outcomes:
                    break
                run = Run()
                entered = 0

                async def init(con: Any, run: Run = run) -> None:
                    nonlocal entered
                    entered += 1
                    run.reached.set()  # (the first connect, awaited; the others are gathered after it)
                    await _gate_or_lock(con, Run(gate=run.gate), gate == "lock")

                if gate == "lock":
                    await admin.execute(f"SELECT pg_advisory_lock({LOCK})")
                holder: dict[str, Any] = {}

                async def create(holder: dict[str, Any] = holder, init: Any = init) -> str:
                    holder["pool"] = pool = safepool.create_pool(
                        pg_dsn, min_size=3, max_size=3, init=init, server_settings={"application_name": app_name})
                    await pool
                    return "created"

                canceller = Canceller(form)
                task = asyncio.create_task(canceller.run(create))
                await asyncio.wait_for(run.reached.wait(), 10)
                if gate == "lock":
                    await _wait_blocked_on_lock(admin, app_name)
                if order == "unblock_then_cancel":
                    if gate == "lock":
                        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
                    run.gate.set()
                    await _steps(k)
                    canceller.fire(task)
                else:
                    canceller.fire(task)
                    await _steps(k)
                    if gate == "lock":
                        await admin.execute(f"SELECT pg_advisory_unlock({LOCK})")
                    run.gate.set()
                try:
                    async with asyncio.timeout(15):
                        outcomes.add(str(await task))
                except (asyncio.CancelledError, TimeoutError) as exc:
                    outcomes.add(type(exc).__name__)
                pool = holder["pool"]
                if pool._state.phase is safepool._state.Phase.OPEN:
                    await check_books(pool, admin, app_name, f"pool_start/{form}/{order}/k={k}")
                    await asyncio.wait_for(pool.close(), 10)
                assert pool._state.size == 0, pool
                pool._state.check_invariants()
                async with asyncio.timeout(10):
                    while await _backends(admin, app_name):
                        await asyncio.sleep(0.002)
                assert not pool._runner.tasks, pool._runner.tasks
            gc.collect()
            await asyncio.sleep(0)
            leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert not leftover, leftover
        assert not unhandled, unhandled
    print(f"OUTCOMES pool_start {gate} {form} {order}: {sorted(outcomes)}")


BUDGETS = [i * 0.0002 for i in range(40)]  # 0 to 7.8 ms: a lease here takes a few ms
TIMED_FORMS = ["asyncio_timeout", "wait_for", "anyio_deadline", "anyio_move_on_finally", "acquire_timeout"]


async def _async_noop(con: Any) -> None:
    await con.execute("SELECT 1")


_TIMED_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "setup": {"setup": lambda con: con.execute("SET work_mem = '7MB'")},
    "init, connect per lease": {"init": _async_noop, "min_size": 0, "max_inactive_connection_lifetime": 0.001},
    "reset hook": {"reset": lambda con: con.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL")},
    "rollback mode": {"reset_mode": "rollback"},
}


@pytest.mark.realtime
@pytest.mark.parametrize("form", TIMED_FORMS)
@pytest.mark.parametrize("config", list(_TIMED_CONFIGS))
async def test_tiny_budgets(pg_dsn: str, app_name: str, config: str, form: str) -> None:
    """Three tasks at once on two connections, each a whole lease (acquire,
    a dirty session, release) under a budget of 0 to 8 ms, in each timed
    form: the budgets land in the queue, the connect, the hooks, the
    queries and the reset. The same books after every budget."""
    options = {"min_size": 2, "max_size": 2, **_TIMED_CONFIGS[config]}
    if config == "rollback mode":
        dirty: Callable[[Any], Awaitable[None]] = lambda con: con.execute("BEGIN; SELECT 1")  # noqa: E731
    else:
        dirty = _dirty
    pool = await safepool.create_pool(pg_dsn, server_settings={"application_name": app_name}, **options)
    outcomes: set[str] = set()

    async def lease(budget: float) -> str:
        if form == "acquire_timeout":
            try:
                con = await pool.acquire(timeout=budget)
            except safepool.PoolTimeoutError:
                return "PoolTimeoutError"
            try:
                await dirty(con)
            finally:
                await pool.release(con)
            return "released"
        canceller = Canceller("anyio_move_on_finally" if form == "anyio_move_on_finally" else "none")

        async def body() -> str:
            async with pool.acquire() as con:
                await dirty(con)
            return "released"

        if form == "asyncio_timeout":
            async with asyncio.timeout(budget):
                return await body()
        if form == "wait_for":
            return await asyncio.wait_for(body(), budget)
        if form == "anyio_deadline":
            with anyio.CancelScope(deadline=anyio.current_time() + budget):
                return await body()
            return "scope cancelled"
        with anyio.move_on_after(budget):
            return str(await canceller.run(body))
        return "moved on"

    try:
        async with _admin(pg_dsn) as admin, Sampler(pg_dsn, app_name) as sampler:
            with loop_errors(allow=_expected_report) as unhandled:
                for budget in BUDGETS:
                    results = await asyncio.gather(*(lease(budget) for _ in range(3)), return_exceptions=True)
                    for result in results:
                        if isinstance(result, BaseException):
                            assert isinstance(result, (asyncio.CancelledError, TimeoutError)), repr(result)
                            outcomes.add(type(result).__name__)
                        else:
                            outcomes.add(result)
                    wm = "7MB" if config == "setup" else "4MB"
                    if config == "rollback mode":
                        await _settle(pool)
                        pool._state.check_invariants()
                        async with pool.acquire() as con:
                            assert not con.is_in_transaction()
                    else:
                        await check_books(pool, admin, app_name, f"{config}/{form}/budget={budget}", wm)
                gc.collect()
                await asyncio.sleep(0)
            assert not unhandled, unhandled
        assert max(sampler.seen) <= 2, max(sampler.seen)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    print(f"OUTCOMES tiny budgets {config} {form}: {sorted(outcomes)}")
