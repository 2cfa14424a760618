"""Review s59: a model-based differential fuzz of safepool against asyncpg's
pool (hypothesis): the same random program on both pools, on a real
PostgreSQL, every observable outcome compared.

A program is a list of steps over a pool of ``max_size`` 2 or 3
(``min_size`` 0 or 1; a ``reset=`` hook on some: one that only runs a
statement, one that records what it is given and sees, one that fails on
every third call) and three lease slots: acquire (with or without a
timeout; with one that runs out when the pool is full), release (once,
twice, with a timeout, in a task cancelled once its release began), a task
waiting in ``acquire()`` served by a release, calls on a released proxy
(and on transactions of released leases), statements from a menu that
changes session state (SET, SET LOCAL, set_config, SET SESSION
CHARACTERISTICS, LISTEN, session / transaction / shared advisory locks,
BEGIN, COMMIT, ROLLBACK, savepoints, cursors with and without HOLD, SQL
PREPARE, temporary tables, a failing statement), ``con.transaction()``
created / started / committed / rolled back, ``async with
con.transaction()`` whose body raises, ``add_listener`` left or removed,
``con.reset()``, ``async with pool.acquire()`` (its body raising or not,
or its task cancelled in ``pg_sleep(0.2)``), the pool's shortcuts (one
cancelled in its query), ``expire_connections()``, and a query's task
cancelled in ``pg_sleep(0.2)`` (the lease released right after or not).
The model keeps programs deterministic: one task runs the steps, other
tasks only at fixed points (a waiter, a cancelled query), and an acquire
without a timeout comes only when a connection is free.

Each program runs on asyncpg's pool, then on safepool (fresh pools, each
with its own application_name). The trace records every step's outcome
(value, or exception class: safepool's own errors as the asyncpg or builtin
class they subclass), warnings, the loop's exception handler calls, what
the ``reset=`` hook saw, the pool's sizes; after each release, what another
session sees of the pool's unleased backends (advisory locks, open
transactions) and, when a connection is free, the next lease's session
(settings with source 'session', LISTEN channels, advisory locks, cursors,
SQL-prepared statements, temporary tables, transaction state). Backends are
named by first appearance (pids differ); temporary tables and SQL PREPARE
survive asyncpg's reset on both pools, so the backend's name is part of the
fingerprint. What docs/migration.md lists as deliberate is normalised away
where it applies (see ``others_see`` and ``reset_hook``): after
``expire_connections()`` or a failed reset the pools hold different
connections.

Found so far: no divergence outside docs/migration.md's list (about 2,700
programs in the review's sweeps as the vocabulary grew, 300 on the final one
plus 60 in four runs of this test). The suite runs 12 programs (about 13 s;
derandomized: the same 12 each run), ``SAFEPOOL_LONG=1`` 300.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepool
from tests._util import asyncpg_version

BOTH = ["asyncpg", "safepool"]
SLOTS = 3
LONG = bool(os.environ.get("SAFEPOOL_LONG"))

MENU: dict[str, str] = {
    "select": "SELECT 1",
    "set": "SET work_mem = '7MB'",
    "set_local": "SET LOCAL statement_timeout = '9s'",
    "set_config": "SELECT set_config('search_path', 'pg_catalog', false)",
    "set_characteristics": "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "listen": "LISTEN model_chan",
    "adv_lock": "SELECT pg_advisory_lock(5901)",
    "adv_try": "SELECT pg_try_advisory_lock(5902)",
    "adv_xact": "SELECT pg_advisory_xact_lock(5903)",
    "adv_shared": "SELECT pg_advisory_lock_shared(5904)",
    "begin": "BEGIN",
    "commit": "COMMIT",
    "rollback": "ROLLBACK",
    "savepoint": "SAVEPOINT s1",
    "rollback_to": "ROLLBACK TO SAVEPOINT s1",
    "release_sp": "RELEASE SAVEPOINT s1",
    "declare": "DECLARE c1 CURSOR FOR SELECT 1",
    "declare_hold": "DECLARE c2 CURSOR WITH HOLD FOR SELECT 1",
    "prepare": "PREPARE p1 AS SELECT 1",
    "temp": "CREATE TEMP TABLE t1 (x int)",
    "temp_on_commit_drop": "CREATE TEMP TABLE t2 (x int) ON COMMIT DROP",
    "fail": "SELECT 1 / 0",
    "txid": "SELECT txid_current() > 0",
}

FINGERPRINT = """
SELECT
  (SELECT coalesce(array_agg(name || '=' || setting ORDER BY name), '{}')
     FROM pg_settings WHERE source = 'session'),
  (SELECT coalesce(array_agg(c ORDER BY c), '{}') FROM pg_listening_channels() c),
  (SELECT coalesce(array_agg(objid::text || ':' || mode ORDER BY objid, mode), '{}')
     FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
  (SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM pg_cursors),
  (SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM pg_prepared_statements WHERE from_sql),
  (SELECT coalesce(array_agg(relname::text ORDER BY relname), '{}')
     FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'),
  txid_current_if_assigned() IS NOT NULL,
  now() = statement_timestamp()
"""


# Calls on a proxy after its release.
STALE = ["old_tx_start", "old_tx_commit", "old_tx_rollback", "fetchval", "transaction", "reset", "cursor", "is_in_transaction", "get_server_pid", "is_closed",
         "get_settings", "get_reset_query"]


def _ignore(*_args: Any) -> None:
    return None


# ------------------------------------------------------------------ programs


@st.composite
def programs(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    max_size = draw(st.sampled_from([2, 3]))
    config: dict[str, Any] = {"min_size": draw(st.sampled_from([0, 1])), "max_size": max_size}
    reset = draw(st.sampled_from([None, None, "select", "observe", "fails"]))
    if reset is not None:
        config["reset"] = reset
    held = [False] * SLOTS
    released = 0
    steps: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 40))):
        free_slots = [i for i in range(SLOTS) if not held[i]]
        taken = [i for i in range(SLOTS) if held[i]]
        room = sum(held) < max_size
        kinds = []
        if free_slots:
            kinds += ["acquire"] * 6
        if taken:
            kinds += ["release"] * 4 + ["sql"] * 16 + ["txn"] * 4 + ["reset", "reset", "cancel", "cancel", "probe", "probe"]
        if released:
            kinds += ["stale"]
        if room:
            kinds += ["scoped"] * 3 + ["shortcut", "scoped_cancel", "scoped_cancel"]
        elif free_slots:
            kinds += ["handoff"] * 3
        if taken:
            kinds += ["listener", "block"]
        kinds.append("expire")
        kind = draw(st.sampled_from(kinds))
        if kind == "acquire":
            slot = draw(st.sampled_from(free_slots))
            if room:
                steps.append(("acquire", slot, draw(st.sampled_from([None, 5.0]))))
                held[slot] = True
            else:
                steps.append(("acquire", slot, 0.05))  # times out on both pools
        elif kind == "release":
            slot = draw(st.sampled_from(taken))
            steps.append(("release", slot, draw(st.sampled_from(["plain", "twice", "timeout", "cancelled"]))))
            held[slot] = False
            released += 1
        elif kind == "sql":
            steps.append(("sql", draw(st.sampled_from(taken)), draw(st.sampled_from(sorted(MENU)))))
        elif kind == "txn":
            steps.append(("txn", draw(st.sampled_from(taken)), draw(st.sampled_from(["start", "create", "commit", "rollback"]))))
        elif kind in ("reset", "probe"):
            steps.append((kind, draw(st.sampled_from(taken))))
        elif kind == "cancel":
            steps.append(("cancel", draw(st.sampled_from(taken)), draw(st.booleans())))
            if steps[-1][2]:
                held[steps[-1][1]] = False
                released += 1
        elif kind == "stale":
            steps.append(("stale", draw(st.sampled_from(STALE))))
        elif kind == "handoff":
            # The pool is full: a task waits in acquire() for ``free_slots``'s
            # slot, and the release of ``source`` serves it.
            source = draw(st.sampled_from(taken))
            steps.append(("handoff", source, draw(st.sampled_from(free_slots))))
            held[source], held[steps[-1][2]] = False, True
            released += 1
        elif kind == "listener":
            steps.append(("listener", draw(st.sampled_from(taken)), draw(st.booleans())))
        elif kind == "block":
            steps.append(("block", draw(st.sampled_from(taken)), draw(st.sampled_from(sorted(MENU)))))
        elif kind == "scoped":
            steps.append(("scoped", draw(st.sampled_from(sorted(MENU))), draw(st.booleans())))
        elif kind == "shortcut":
            steps.append(("shortcut", draw(st.sampled_from(["fetchval", "execute", "cancelled"]))))
        elif kind == "scoped_cancel":
            steps.append(("scoped_cancel", draw(st.sampled_from(sorted(MENU)))))
        else:
            steps.append(("expire",))
    steps.extend(("release", slot, "plain") for slot in range(SLOTS) if held[slot])
    return config, steps


# ------------------------------------------------------------------ running


@dataclass
class Run:
    pool: Any
    admin: asyncpg.Connection
    app: str
    max_size: int
    trace: list[Any] = field(default_factory=list)
    held: list[Any] = field(default_factory=lambda: [None] * SLOTS)
    released: list[Any] = field(default_factory=list)
    transactions: dict[int, list[Any]] = field(default_factory=lambda: {i: [] for i in range(SLOTS)})
    old_transactions: list[Any] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    handler_calls: list[str] = field(default_factory=list)
    hook_calls: list[Any] = field(default_factory=list)
    reset_calls: int = 0
    expired: bool = False  # expire_connections() was called, or a reset failed
    renamed: bool = False  # a reset failed: which backend a lease gets may differ

    def drop(self, slot: int) -> None:
        """The slot's lease ends: its transaction objects become stale."""
        self.old_transactions += self.transactions[slot]
        self.transactions[slot] = []

    def name(self, pid: int) -> str:
        if self.renamed:
            return "?"
        return self.names.setdefault(pid, f"B{len(self.names)}")


def scrub(text: str) -> str:
    text = re.sub(r"0x[0-9a-f]+", "0x?", text)
    return re.sub(r"<[A-Za-z_.]*(Connection|Proxy)[^>]*>", "<connection>", text)


def describe(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if not cls.__module__.startswith("safepool"):
            return cls.__name__
    return type(exc).__name__  # pragma: no cover


def value(result: Any) -> Any:
    if isinstance(result, list):
        return [value(item) for item in result]
    if isinstance(result, asyncpg.Record):
        return tuple(value(v) for v in result.values())
    return result


async def fingerprint(run: Run, con: Any) -> tuple[Any, ...]:
    row = await con.fetchrow(FINGERPRINT)
    return (run.name(con.get_server_pid()), con.is_in_transaction(), *value(row))


async def others_see(run: Run) -> tuple[Any, ...]:
    """Another session's view of the pool's backends that are not leased."""
    leased = set()
    for con in run.held:
        if con is not None:
            with contextlib.suppress(asyncpg.InterfaceError):
                leased.add(con.get_server_pid())
    rows = await run.admin.fetch(
        """
        SELECT a.pid, a.state,
               (SELECT coalesce(array_agg(l.objid::text || ':' || l.mode ORDER BY l.objid, l.mode), '{}')
                  FROM pg_locks l WHERE l.locktype = 'advisory' AND l.pid = a.pid)
        FROM pg_stat_activity a WHERE a.application_name = $1 AND NOT (a.pid = ANY($2::int[]))
        """,
        run.app,
        sorted(leased),
    )
    seen = sorted((r["state"], tuple(r[2])) for r in rows)
    if run.expired:
        # Which connections exist differs by design after
        # expire_connections() (safepool closes idle ones at once, asyncpg's
        # pool keeps them until picked) and after a failed reset: the idle
        # ones are no longer compared.
        seen = sorted({s for s in seen if s[0] not in ("idle", "starting", None)})
    return tuple(seen)


def reset_hook(run: Run, kind: str) -> Any:
    """A ``reset=`` hook: asyncpg's pool calls it on every release, after
    its own rollback, instead of the reset query (``select``: the session
    keeps its SETs, LISTENs and advisory locks); ``observe`` records what
    it is given and sees; ``fails`` raises on every third call."""

    async def hook(con: Any) -> None:
        run.reset_calls += 1
        if kind == "observe":
            seen = await con.fetchrow(
                "SELECT (SELECT count(*) FROM pg_listening_channels()),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),"
                " current_setting('work_mem')"
            )
            run.hook_calls.append((type(con).__name__.replace("Pool", ""), con.is_in_transaction(), *seen))
            await con.execute("RESET ALL")
        else:
            await con.execute("SELECT 1")
        if kind == "fails" and run.reset_calls % 3 == 0:
            # Both pools give the connection up, then reopen min_size
            # their own ways (docs/migration.md, "A release whose reset
            # failed"): which connections exist differs from here on.
            # asyncpg's pool aborts the connection, safepool closes it and
            # waits for the backend to end: asyncpg's backend may hold its
            # session advisory locks a moment after release() raised (a
            # race, not compared).
            await con.execute("SELECT pg_advisory_unlock_all()")
            run.expired = run.renamed = True
            raise LookupError("reset hook failed")

    return hook


async def until_in_server_wait(run: Run, task: asyncio.Future[Any]) -> None:
    """Until ``task`` has ended or a backend of the pool waits on the server:
    in ``pg_sleep`` or for a lock (a menu statement blocked by another
    slot's lock). One task runs the program's steps, so that backend is the
    task's. (Was: 50 ms of real time, which a loaded machine can spend
    before the statement reaches the server.)"""
    async with asyncio.timeout(5):
        while not task.done() and not await run.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND (wait_event = 'PgSleep' OR wait_event_type = 'Lock')",
            run.app,
        ):
            await asyncio.sleep(0.005)


async def until_settled(run: Run) -> None:
    """Until every connection of the pool not held by a slot is idle, and
    the server counts as many backends of the pool as it has connections: a
    reset (or close, or min_size's connect) that a cancelled task began has
    ended, on either pool (asyncpg's holder counts as idle once its release
    finished; a connection it closed leaves its count at once, its backend
    the server's a moment later). (Was: 50 ms of real time.)"""
    pool = run.pool
    async with asyncio.timeout(5):
        while pool.get_idle_size() != pool.get_size() - sum(con is not None for con in run.held) or (
            await run.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", run.app)
            != pool.get_size()
        ):
            await asyncio.sleep(0.005)


def queued(pool: Any) -> int:
    """Tasks waiting for a connection: safepool's stats(); asyncpg's pool
    has no public count, its waiters are its holder queue's getters."""
    if isinstance(pool, safepool.Pool):
        return int(pool.stats().waiting)
    return sum(not getter.done() for getter in pool._queue._getters)


async def cancel_soon(run: Run, coro: Any) -> Any:
    """Run ``coro`` in a task, cancel it once its statement waits on the
    server, wait for it to end, then until the pool has settled (a reset it
    began ends meanwhile on both pools)."""
    task = asyncio.ensure_future(coro)
    await until_in_server_wait(run, task)
    task.cancel()
    try:
        outcome: Any = ("finished", value(await task))
    except asyncio.CancelledError:
        outcome = "cancelled"
    except Exception as exc:
        outcome = ("error", describe(exc))
    await until_settled(run)
    return outcome


async def perform(run: Run, step: tuple[Any, ...]) -> Any:
    kind = step[0]
    pool = run.pool
    if kind == "acquire":
        _, slot, timeout = step
        con = await (pool.acquire() if timeout is None else pool.acquire(timeout=timeout))
        run.held[slot] = con
        return run.name(con.get_server_pid())
    if kind == "release":
        _, slot, how = step
        con, run.held[slot] = run.held[slot], None
        run.drop(slot)
        run.released.append(con)
        if how == "timeout":
            return await pool.release(con, timeout=5)
        if how == "cancelled":
            # The releasing task is cancelled once its release has begun (a
            # lease that ran a statement: both pools then suspend in it).
            await con.fetchval("SELECT 1")
            task = asyncio.ensure_future(pool.release(con))
            await asyncio.sleep(0)
            task.cancel()
            try:
                outcome = ("returned", await task)
            except asyncio.CancelledError:
                outcome = "cancelled"
            await until_settled(run)  # the reset it began ends meanwhile, on both pools
            return outcome
        first = await pool.release(con)
        if how == "twice":
            return (first, await pool.release(con))
        return first
    if kind == "stale":
        con = run.released[-1]
        what = step[1]
        if what.startswith("old_tx_"):
            if not run.old_transactions:
                return "none"
            tr = run.old_transactions[-1]
            await getattr(tr, what[len("old_tx_"):])()
            return "ran"
        if what == "fetchval":
            return await con.fetchval("SELECT 1")
        if what == "transaction":
            tr = con.transaction()
            await tr.start()
            return "started"
        if what == "reset":
            return await con.reset()
        if what == "cursor":
            return await con.cursor("SELECT 1")
        return getattr(con, what)()
    if kind == "handoff":
        _, source, target = step
        waiter = asyncio.ensure_future(pool.acquire())
        async with asyncio.timeout(5):  # (the pool is full: it waits)
            while not queued(pool):
                await asyncio.sleep(0.005)
        con, run.held[source] = run.held[source], None
        run.drop(source)
        run.released.append(con)
        try:
            first: Any = ("ok", await pool.release(con))
        except Exception as exc:  # a failing reset= hook: the waiter gets a new connection
            first = ("error", describe(exc))
        new = run.held[target] = await waiter
        return (first, await fingerprint(run, new))
    if kind == "listener":
        _, slot, remove = step
        con = run.held[slot]
        await con.add_listener("model_chan", _ignore)
        if remove:
            await con.remove_listener("model_chan", _ignore)
        return "added"
    if kind == "block":
        # A transaction block whose body raises after a statement.
        _, slot, name = step
        con = run.held[slot]
        with contextlib.suppress(LookupError):
            async with con.transaction():
                await con.fetch(MENU[name])
                raise LookupError("block raised")
        return con.is_in_transaction()
    if kind == "sql":
        _, slot, name = step
        return await run.held[slot].fetch(MENU[name])
    if kind == "txn":
        _, slot, action = step
        con = run.held[slot]
        if action in ("start", "create"):
            tr = con.transaction()
            run.transactions[slot].append(tr)
            if action == "create":
                return "created"
            await tr.start()
            return con.is_in_transaction()
        if not run.transactions[slot]:
            return "none"
        tr = run.transactions[slot].pop()
        await (tr.commit() if action == "commit" else tr.rollback())
        return con.is_in_transaction()
    if kind == "reset":
        con = run.held[step[1]]
        await con.reset()
        run.transactions[step[1]] = []
        return con.is_in_transaction()
    if kind == "probe":
        return await fingerprint(run, run.held[step[1]])
    if kind == "cancel":
        _, slot, then_release = step
        con = run.held[slot]
        task = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(0.2)"))
        await until_in_server_wait(run, task)
        task.cancel()
        try:
            outcome: Any = ("finished", await task)
        except asyncio.CancelledError:
            outcome = "cancelled"
        except Exception as exc:
            outcome = ("error", describe(exc))
        if then_release:
            run.held[slot] = None
            run.drop(slot)
            run.released.append(con)
            return (outcome, await pool.release(con))
        return outcome
    if kind == "scoped":
        _, name, fail = step
        async with pool.acquire() as con:
            result = await con.fetch(MENU[name])
            if fail:
                raise LookupError("body raised")
            return value(result)
    if kind == "scoped_cancel":
        # A task holding a lease (async with) is cancelled in its query
        # (a request cancelled, asyncio.timeout() around it).
        _, name = step

        async def body() -> None:
            async with pool.acquire() as con:
                with contextlib.suppress(asyncpg.PostgresError):
                    await con.fetch(MENU[name])
                await con.fetchval("SELECT pg_sleep(0.2)")

        return await cancel_soon(run, body())
    if kind == "shortcut":
        if step[1] == "fetchval":
            return await pool.fetchval("SELECT 40 + 2")
        if step[1] == "cancelled":
            return await cancel_soon(run, pool.fetchval("SELECT pg_sleep(0.2)"))
        return await pool.execute("SET work_mem = '9MB'")
    if kind == "expire":
        run.expired = True
        return await pool.expire_connections()
    raise AssertionError(step)


async def record(run: Run, index: int, step: tuple[Any, ...]) -> None:
    run.handler_calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            async with asyncio.timeout(1.5):
                outcome: Any = ("ok", value(await perform(run, step)))
        except Exception as exc:
            outcome = ("error", describe(exc))
        await asyncio.sleep(0)
    sizes = None if run.expired else (run.pool.get_size(), run.pool.get_idle_size())
    run.trace.append(
        (
            index,
            step,
            outcome,
            sorted(f"{w.category.__name__}: {scrub(str(w.message))}" for w in caught),
            # asyncpg's shielded release task, its caller cancelled, logs a
            # failing reset=/reset query as never retrieved: asyncpg's noise.
            sorted(call for call in run.handler_calls if call != "Task exception was never retrieved"),
            sizes,
            run.hook_calls,
        )
    )
    run.hook_calls = []
    if step[0] in ("release", "scoped", "scoped_cancel", "shortcut", "expire", "handoff") or (step[0] == "cancel" and step[2]):
        run.trace.append((index, "others see", await others_see(run)))
        if sum(con is not None for con in run.held) < run.max_size:
            try:
                async with asyncio.timeout(3):
                    con = await run.pool.acquire()
                    try:
                        seen: Any = await fingerprint(run, con)
                    finally:
                        await run.pool.release(con)
            except Exception as exc:
                seen = ("error", describe(exc))
            run.trace.append((index, "next lease", seen))


async def trace_on(flavour: str, dsn: str, config: dict[str, Any], program: list[tuple[Any, ...]]) -> list[Any]:
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    app = f"h170-{flavour}-{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    loop = asyncio.get_running_loop()
    try:
        options = dict(config)
        hook = options.pop("reset", None)
        run = Run(None, admin, app, config["max_size"])
        if hook is not None:
            options["reset"] = reset_hook(run, hook)
        pool = run.pool = await factory(dsn, server_settings={"application_name": app}, **options)
        loop.set_exception_handler(lambda _loop, ctx: run.handler_calls.append(scrub(str(ctx.get("message")))))
        try:
            for index, step in enumerate(program):
                await record(run, index, step)
            try:
                async with asyncio.timeout(5):
                    await pool.close()
                run.trace.append(("closed", pool.get_size()))
            except Exception as exc:
                run.trace.append(("close", describe(exc)))
        finally:
            pool.terminate()
            loop.set_exception_handler(None)
        return run.trace
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app)
        await admin.close()


def first_difference(a: list[Any], b: list[Any]) -> int | None:
    for index, (left, right) in enumerate(zip(a, b, strict=False)):
        if left != right:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


async def both(dsn: str, config: dict[str, Any], program: list[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
    expected = await trace_on("asyncpg", dsn, config, program)
    actual = await trace_on("safepool", dsn, config, program)
    return expected, actual


@pytest.mark.slow
@pytest.mark.skipif(
    asyncpg_version() < (0, 32),
    reason="the reference is asyncpg 0.32's pool, which safepool keeps whatever asyncpg is installed; "
    "asyncpg 0.29 lacks create_pool(reset=), and 0.29-0.31's pool hands the next acquire a closed "
    "connection's holder before an idle live one (a LifoQueue; 0.32's queue prefers live connections) "
    "and does not restore min_size",
)
@settings(
    max_examples=300 if LONG else 12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=programs())
def test_model_programs_same_on_both_pools(pg_dsn: str, case: tuple[dict[str, Any], list[tuple[Any, ...]]]) -> None:
    config, program = case
    expected, actual = asyncio.run(both(pg_dsn, config, program))
    at = first_difference(expected, actual)
    if at is not None:
        lines = [f"config {config}: traces differ at entry {at}", "program:"]
        lines += [f"  {i:3d} {step}" for i, step in enumerate(program)]
        lines += ["asyncpg:", *(f"  {e}" for e in expected[max(0, at - 2) : at + 2])]
        lines += ["safepool:", *(f"  {e}" for e in actual[max(0, at - 2) : at + 2])]
        pytest.fail("\n".join(lines))
