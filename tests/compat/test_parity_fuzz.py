"""Random programs, run once on asyncpg's pool and once on safepool: the
traces must be the same (the differential form of tests/compat/test_parity.py).

A program is a seeded sequence of steps on a two-connection pool: acquire
and release (twice, with a timeout, ``async with`` whose body may raise),
statements from a vocabulary that changes session and server state
(settings, transactions by SQL and by ``Connection.transaction()`` with an
isolation level or read-only, nested ones as savepoints, advisory and row
locks, LISTEN, cursors, notices, errors), queries with arguments, prepared
statements (also after a failed transaction), COPY, ``executemany`` (also
failing half-way), listeners, log listeners and termination listeners left
registered, a type codec set and reset within a lease, a statement
cancelled by its caller, ``reset()`` and ``close()`` on a leased
connection, the pool's query shortcuts, ``expire_connections()``, and calls
on proxies, cursors, prepared statements and transactions after their lease
ended. The pool's configuration is drawn from the seed too (the same on
both pools): ``init=`` (a type codec, a SET), ``setup=`` (a query, a SET,
one that fails now and then), a ``connection_class`` overriding
``reset()``, a small ``max_queries``, ``statement_cache_size=0``. Each step
is recorded as what application code can observe: the value returned, the
exception's class and message, the warnings raised, the loop's exception
handler calls, the listeners' calls, the pool's sizes. After each release an
admin session records what the other sessions see (advisory locks and open
transactions of the pool's connections not leased, whether the row locks
are free); after most acquires the lease records its own session (settings,
LISTEN channels, cursors, advisory locks, transaction status).

The vocabulary leaves out what asyncpg's reset leaves in the session on
both pools (temporary tables, SET ROLE, SQL-level PREPARE: see
docs/reset-modes.md); with it, which backend a lease gets would decide the
outcome. Both pools hand out the most recently released connection first
(asyncpg's LIFO queue, safepool's idle stack), yet the traces do not depend
on it. Known, documented differences are normalised away, each where it is
applied: safepool's errors are subclasses of asyncpg's with messages of
their own (the acquire timeout), and which connections the pools hold
differs by design after ``expire_connections()``, a leased connection's
``close()``, a failing ``setup=`` and under ``max_queries=`` (see
``diverge()``).

``SAFEPOOL_LONG=1`` runs 600 programs instead of 40. A failing seed prints
both traces from the first difference, with the program."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

import safepool

LONG = bool(os.environ.get("SAFEPOOL_LONG"))
# 40 programs in the suite (600 long); the version matrix's cells run 5
# each (SAFEPOOL_PARITY_PROGRAMS, set by .ci/matrix.py, to keep .ci/run in
# time), each cell its own (SAFEPOOL_PARITY_FIRST: the first seed), so
# that together they run programs the suite does not.
_FIRST = int(os.environ.get("SAFEPOOL_PARITY_FIRST") or 0)
SEEDS = range(_FIRST, _FIRST + int(os.environ.get("SAFEPOOL_PARITY_PROGRAMS") or (600 if LONG else 40)))
# safepool's options that must change nothing a program sees: the default
# pool, reset_mode="auto" (it skips resets only where the session provably
# did not change), and the observing and opt-in protections set far above
# anything a program here reaches. The last two run on every other seed.
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "auto": {"reset_mode": "auto"},
    "protections": {
        "lease_timeout": 60,
        "leak_warning_after": 60,
        "capture_stack": True,
        "max_waiters": 100,
        "acquire_timeout": 60,
        "fail_fast": True,
        "wait_on_connect_error": True,
    },
}
CASES = [(name, seed) for name in OPTIONS for seed in SEEDS if name == "default" or seed % 2 == 0]
STEPS = 60
HANDLES = 2  # the pools' max_size: a third acquire waits
# Per process: matrix cells sharing a server (SAFEPOOL_TEST_DSN) do not meet.
TABLE = f"parity_fuzz_{os.getpid()}"
SEQUENCE = f"{TABLE}_ids"

# Statements that may change the session, the transaction or server state.
# (name, SQL): the name is what the trace shows. None may wait for another
# lease (row locks are taken NOWAIT, inserts take fresh keys): a program is
# one task, so a wait would last until the step's timeout, and how a
# timed-out statement races the other lease's release is up to the server.
STATEMENTS: list[tuple[str, str]] = [
    ("select", "SELECT 1"),
    ("select_args", "SELECT 2 + 2"),
    ("set_search_path", "SET search_path = pg_catalog, public"),
    ("set_timeout", "SET statement_timeout = '7s'"),
    ("set_local", "SET LOCAL work_mem = '3MB'"),
    ("set_config_session", "SELECT set_config('application_name', 'parity-fuzz-x', false)"),
    ("set_config_local", "SELECT set_config('work_mem', '5MB', true)"),
    ("begin", "BEGIN"),
    ("begin_serializable", "BEGIN ISOLATION LEVEL SERIALIZABLE"),
    ("commit", "COMMIT"),
    ("rollback", "ROLLBACK"),
    ("savepoint", "SAVEPOINT fuzz_sp"),
    ("rollback_to", "ROLLBACK TO SAVEPOINT fuzz_sp"),
    ("advisory_try", "SELECT pg_try_advisory_lock(4242)"),
    ("advisory_try_other", "SELECT pg_try_advisory_lock(4243)"),
    ("advisory_unlock", "SELECT pg_advisory_unlock(4242)"),
    ("advisory_xact", "SELECT pg_try_advisory_xact_lock(4244)"),
    ("advisory_shared", "SELECT pg_try_advisory_lock_shared(4245)"),
    ("listen", "LISTEN parity_fuzz"),
    ("notify", "NOTIFY parity_fuzz, 'x'"),
    ("unlisten", "UNLISTEN parity_fuzz"),
    ("declare_hold", "DECLARE fuzz_hold CURSOR WITH HOLD FOR SELECT generate_series(1, 3)"),
    ("declare", "DECLARE fuzz_cur CURSOR FOR SELECT generate_series(1, 3)"),
    ("fetch_cursor", "FETCH 1 FROM fuzz_hold"),
    ("close_cursor", "CLOSE fuzz_hold"),
    ("row_lock", f"SELECT id FROM {TABLE} WHERE id = 1 FOR UPDATE NOWAIT"),
    ("row_lock_2", f"SELECT id FROM {TABLE} WHERE id = 2 FOR UPDATE NOWAIT"),
    ("update", f"UPDATE {TABLE} SET v = v + 1 WHERE id = (SELECT id FROM {TABLE} WHERE id = 3 FOR UPDATE NOWAIT)"),
    ("insert", f"INSERT INTO {TABLE} (id, v) VALUES (nextval('{SEQUENCE}'), 0)"),
    ("division_by_zero", "SELECT 1 / 0"),
    ("syntax_error", "SELEC 1"),
    ("unknown_table", "SELECT * FROM parity_fuzz_missing"),
    ("two_statements", "SELECT 1; SET search_path = public"),
    ("show", "SHOW search_path"),
    ("notice", "DO $$BEGIN RAISE NOTICE 'parity fuzz notice'; END$$"),
    ("json", "SELECT '{\"a\": [1, 2]}'::json"),
]

# Pool configurations, drawn per seed (the same on both pools): what a
# program's hooks and connect arguments are. Each entry is (option, the
# choices it may take, how often it is set at all).
CONFIG_CHOICES: list[tuple[str, list[str], float]] = [
    # init=: once per new connection. "set" is visible to the first lease of
    # a connection only (the reset's RESET ALL ends it); "codec" survives
    # resets (a client-side json decoder: the "json" statement shows it).
    ("init", ["codec", "set", "codec_and_set"], 0.3),
    # setup=: on every acquire, as the lease's first statement; "set" changes
    # the session (reset on release like any SET), "fails" raises on every
    # fourth call (the connection is closed and the acquire raises).
    ("setup", ["select", "set", "fails"], 0.35),
    # connection_class= whose reset() calls asyncpg's, then counts the call
    # and sets DateStyle: the next lease of that connection sees it.
    ("connection_class", ["reset_override"], 0.15),
    ("max_queries", ["3", "4", "5"], 0.15),  # connections replaced on release
    ("statement_cache_size", ["0"], 0.25),  # every statement unnamed
]


def make_config(seed: int) -> dict[str, str]:
    rng = random.Random(f"config {seed}")
    config: dict[str, str] = {}
    for option, choices, chance in CONFIG_CHOICES:
        if rng.random() < chance:
            config[option] = rng.choice(choices)
    return config


class ObservedResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class overriding ``reset()`` (the pool calls it on every
    release): asyncpg's reset, then something each later lease observes."""

    resets: list[int] = []  # one entry per call; emptied before each run

    async def reset(self, *, timeout: float | None = None) -> None:
        await super().reset(timeout=timeout)
        self.resets.append(1)
        await self.execute("SET DateStyle = 'ISO, DMY'")


def pool_options(config: dict[str, str], run: Run) -> dict[str, Any]:
    """``create_pool`` keywords for ``config``, with hooks for ``run`` (the
    failing setup's schedule, by its calls, is the same on both pools)."""
    options: dict[str, Any] = {}
    init = config.get("init")
    if init is not None:

        async def init_hook(con: asyncpg.Connection) -> None:
            if "codec" in init:
                await con.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            if "set" in init:
                await con.execute("SET lock_timeout = '4s'")

        options["init"] = init_hook
    setup = config.get("setup")
    if setup is not None:

        async def setup_hook(con: Any) -> None:
            run.setup_calls += 1
            if setup == "set":
                await con.execute("SET extra_float_digits = 2")
            else:
                await con.execute("SELECT 1")
            if setup == "fails" and run.setup_calls % 4 == 0:
                # The step's own sizes are still compared: both pools wait
                # for the close before the acquire raises.
                run.setup_failed = True
                raise LookupError("setup failed")

        options["setup"] = setup_hook
    if "connection_class" in config:
        options["connection_class"] = ObservedResetConnection
    if "max_queries" in config:
        options["max_queries"] = int(config["max_queries"])
    if "statement_cache_size" in config:
        options["statement_cache_size"] = int(config["statement_cache_size"])
    return options


UPDATE_ROW_4 = f"UPDATE {TABLE} SET v = v + $1 WHERE id = (SELECT id FROM {TABLE} WHERE id = 4 FOR UPDATE NOWAIT)"

# What the lease itself sees of its session.
SESSION_PROBE = """
SELECT current_setting('search_path'), current_setting('statement_timeout'),
       current_setting('work_mem'), current_setting('application_name'),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_cursors),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       now() = statement_timestamp(),
       current_setting('lock_timeout'), current_setting('extra_float_digits'), current_setting('DateStyle')
"""


@dataclass
class Run:
    """One program's run on one pool: the handles it holds and the trace."""

    pool: Any
    admin: asyncpg.Connection
    trace: list[tuple[Any, ...]] = field(default_factory=list)
    held: list[Any] = field(default_factory=lambda: [None] * HANDLES)
    closed: set[int] = field(default_factory=set)  # held slots whose connection the program closed, until released
    released: list[Any] = field(default_factory=list)
    transactions: list[Any] = field(default_factory=list)
    cursors: list[Any] = field(default_factory=list)
    statements: list[Any] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    handler_calls: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)  # log and termination listeners' calls
    terminations: int = 0  # termination listener calls, counted once the pools diverged
    diverged: str = ""  # why the pools' connections may differ from here on (see diverge())
    count_resets: bool = False  # connection_class=ObservedResetConnection
    setup_calls: int = 0
    setup_failed: bool = False
    # Under max_queries= a release resets on one pool and closes on the
    # other (see trace_on): only a reset reports an open transaction.
    reports_differ: bool = False
    next_id: int = 1000  # keys for COPY


def diverge(run: Run, reason: str) -> None:
    """From here on the two pools may hold different connections, by design
    (docs/migration.md, "Also different"): after ``expire_connections()``
    safepool closes expired idle connections at once and reopens
    ``min_size`` in the background, where asyncpg's pool replaces each at
    its next acquire; after a connection closed under a lease (``close()``,
    a failing ``setup=``, ``max_queries=``) both restore ``min_size`` in the
    background, and an acquire meanwhile is served by that connect on
    safepool where asyncpg's pool opens one more; safepool counts a closed
    leased connection until the server confirms its backend is gone. So
    what depends on which connections exist is no longer compared: the
    sizes, when idle connections' termination listeners fire (counted, the
    count compared at the end), and whether a lease's connection is new
    (what ``init=`` and the overridden ``reset()`` leave in the session)."""
    if not run.diverged:
        run.diverged = reason


def describe(exc: BaseException) -> tuple[str, str]:
    """What a program sees of an error: its class and message, the address
    in a repr taken out. safepool's own errors are shown as the asyncpg or
    builtin class they subclass, without their message (documented: the
    same class as asyncpg's, a message of safepool's; docs/api.md), but
    for the misuse and bad arguments asyncpg refuses too: those carry
    asyncpg's message, compared."""
    if isinstance(exc, safepool.PoolError):
        name = next(cls.__name__ for cls in type(exc).__mro__ if not cls.__module__.startswith("safepool"))
        if isinstance(exc, (safepool.PoolInterfaceError, safepool.PoolArgumentError)):
            return name, scrub(str(exc))
        return name, "(safepool's message)"
    if isinstance(exc, TimeoutError):
        # asyncpg's acquire timeout: a bare asyncio.TimeoutError.
        return "TimeoutError", "(safepool's message)"
    return type(exc).__name__, scrub(str(exc))


def scrub(text: str) -> str:
    text = re.sub(r"0x[0-9a-f]+", "0x?", text)
    text = re.sub(r"__asyncpg_([a-z]+)_[0-9a-f]+__", r"__asyncpg_\1_?__", text)  # asyncpg's counters
    return re.sub(r"<[A-Za-z_.]*(Connection|Proxy)[^>]*>", "<connection>", text)


def value(result: Any) -> Any:
    if isinstance(result, list):
        return [value(item) for item in result]
    if isinstance(result, asyncpg.Record):
        return tuple(result.values())
    return result


# Step kinds on a held connection and their weights (acquire and release
# are chosen first, see make_program).
ON_HELD: list[tuple[str, int]] = [
    ("sql", 40),
    ("transaction", 6),
    ("cursor", 4),
    ("prepare", 4),
    ("stale", 4),
    ("state", 3),
    ("shortcut", 3),
    ("scoped", 3),
    ("copy", 2),
    ("executemany", 2),
    ("expire", 2),
    ("acquire_timeout", 2),
    ("listener", 2),
    ("log_listener", 1),
    ("cancel", 1),
    ("reset", 1),
    ("close", 1),
    ("args", 3),
    ("nested", 2),
    ("executemany_fail", 1),
    ("prepare_after_failed", 1),
    ("termination_listener", 1),
    ("codec", 1),
    ("logged", 1),
]
# The step kinds that act on a held connection (its slot is step[1]).
HELD_KINDS = {
    "sql", "transaction", "cursor", "prepare", "state", "copy", "executemany", "listener", "log_listener",
    "cancel", "reset", "close", "args", "nested", "executemany_fail", "prepare_after_failed",
    "termination_listener", "codec",
}
ISOLATIONS = ["serializable", "repeatable_read", "read_committed", "read_only"]


def make_program(seed: int) -> list[tuple[Any, ...]]:
    """The steps, from ``seed``: each a tuple (kind, arguments...). Which
    handles are held is tracked so that a third acquire is rare and bounded
    by a timeout, and the steps that take a connection of their own (the
    pool's shortcuts, ``async with``) run only with one free."""
    rng = random.Random(seed)
    held = [False] * HANDLES
    steps: list[tuple[Any, ...]] = []
    kinds = [name for name, _ in ON_HELD]
    weights = [weight for _, weight in ON_HELD]
    while len(steps) < STEPS:
        free = [i for i in range(HANDLES) if not held[i]]
        taken = [i for i in range(HANDLES) if held[i]]
        roll = rng.random()
        if not taken or (free and roll < 0.18):
            slot = rng.choice(free)
            steps.append(("acquire", slot, rng.random() < 0.75))
            held[slot] = True
            continue
        if roll < 0.30:
            slot = rng.choice(taken)
            steps.append(("release", slot, rng.choice(["plain", "plain", "twice", "timeout"])))
            held[slot] = False
            continue
        kind = rng.choices(kinds, weights)[0]
        slot = rng.choice(taken)
        if kind in ("shortcut", "scoped", "logged") and not free:
            continue
        if kind == "acquire_timeout" and free:
            continue
        if kind == "sql":
            steps.append(("sql", slot, rng.choice(STATEMENTS)[0], rng.choice(["execute", "fetch"])))
        elif kind == "transaction":
            action = rng.choice(["start", "start", "isolation", "commit", "rollback"])
            if action == "isolation":
                steps.append(("transaction", slot, "start", rng.choice(ISOLATIONS)))
            else:
                steps.append(("transaction", slot, action))
        elif kind == "args":
            steps.append(("args", slot, rng.choice(["fetchrow", "fetchval"])))
        elif kind == "prepare":
            steps.append(("prepare", slot, rng.choice(["fetchval", "fetch"])))
        elif kind == "stale":
            steps.append(("stale", rng.choice(["proxy", "cursor", "statement", "transaction"])))
        elif kind == "shortcut":
            steps.append(("shortcut", rng.choice(["fetchval", "execute", "fetch", "executemany"])))
        elif kind == "scoped":
            steps.append(("scoped", rng.choice(STATEMENTS)[0], rng.random() < 0.3))
        elif kind == "logged":
            steps.append(("logged", rng.random() < 0.5))
        elif kind in ("expire", "acquire_timeout"):
            steps.append((kind,))
        else:
            steps.append((kind, slot))
    steps.extend(("release", slot, "plain") for slot in range(HANDLES) if held[slot])
    return steps


async def run_program(run: Run, program: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: run.handler_calls.append(scrub(str(context.get("message")))))
    try:
        for index, step in enumerate(program):
            await record(run, index, step)
    finally:
        loop.set_exception_handler(previous_handler)
    run.trace.append(("table", [tuple(r) for r in await run.admin.fetch(f"SELECT id, v FROM {TABLE} ORDER BY id")]))
    return run.trace


async def record(run: Run, index: int, step: tuple[Any, ...]) -> None:
    run.handler_calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            async with asyncio.timeout(10):
                outcome: Any = ("ok", value(await perform(run, step)))
        except Exception as exc:
            outcome = ("error", *describe(exc))
        # Callbacks the step queued run before they are recorded: asyncpg
        # calls listeners with call_soon, and which step a callback lands in
        # must not depend on whether the step's last await took a loop hop.
        await asyncio.sleep(0)
    run.trace.append(
        (
            index,
            step,
            outcome,
            sorted(f"{w.category.__name__}: {scrub(str(w.message))}" for w in caught),
            sorted(call for call in run.handler_calls if not (run.reports_differ and call.startswith(ACTIVE_XACT))),
            callbacks(run),
            sizes(run),
            *([("resets", len(ObservedResetConnection.resets))] if run.count_resets else []),
        )
    )
    if run.setup_failed:
        diverge(run, "a failing setup=")
    if step[0] in ("release", "shortcut", "scoped", "expire", "logged"):
        run.trace.append((index, "seen by others", await others_see(run)))


ACTIVE_XACT = "Resetting connection with an active transaction"


def callbacks(run: Run) -> list[str]:
    """The listener calls since the last step's (see ``diverge()``)."""
    calls, run.callbacks = run.callbacks, []
    if not run.diverged:
        return calls
    run.terminations += calls.count("terminated")
    return [call for call in calls if call != "terminated"]


def sizes(run: Run) -> tuple[Any, ...]:
    """``get_size()`` and ``get_idle_size()``, until the pools diverge (see
    ``diverge()``)."""
    if run.diverged:
        return ("size", f"not compared after {run.diverged}")
    return ("size", run.pool.get_size(), run.pool.get_idle_size())


async def perform(run: Run, step: tuple[Any, ...]) -> Any:
    kind = step[0]
    pool = run.pool
    if kind == "acquire":
        _, slot, probe = step
        con = await pool.acquire()
        run.held[slot] = con
        run.pids.add(con.get_server_pid())
        if not probe:
            return "leased"
        seen = tuple(await con.fetchrow(SESSION_PROBE))
        if run.diverged:
            # What init= and the overridden reset() leave is seen by a new
            # connection's first lease only, or by a reused one's (see diverge()).
            seen = (*seen[:8], "(masked)", seen[9], "(masked)")
        return seen
    if kind == "acquire_timeout":
        # The generator emits it with both handles taken: the pool is full,
        # and both pools time out at once. But a handle whose acquire raised
        # (a failing setup=) holds nothing: the pool then has room, and the
        # acquire may have to open a connection, which on a loaded machine
        # takes longer than 20 ms (a cell of the matrix saw asyncpg's leased,
        # safepool's timed out): give that connect time, so the outcome does
        # not depend on the machine's speed. So does a handle whose leased
        # connection the program closed: both pools end that lease at the
        # close() (seed 91 of a 3.13/0.31 cell: asyncpg's connect timed out).
        room = any(con is None for con in run.held) or bool(run.closed)
        con = await pool.acquire(timeout=10.0 if room else 0.02)
        await pool.release(con)
        return "leased"
    if kind == "release":
        _, slot, how = step
        con, run.held[slot] = run.held[slot], None
        run.closed.discard(slot)
        if con is None:
            return "not held"  # its acquire raised (a failing setup=)
        run.released.append(con)
        if how == "timeout":
            return await pool.release(con, timeout=5)
        await pool.release(con)
        if how == "twice":
            return await pool.release(con)
        return None
    if kind in HELD_KINDS and run.held[step[1]] is None:
        return "not held"  # its acquire raised (a failing setup=)
    if kind == "sql":
        _, slot, name, method = step
        sql = dict(STATEMENTS)[name]
        con = run.held[slot]
        if method == "fetch" and ";" not in sql:
            return await con.fetch(sql)
        return await con.execute(sql)
    if kind == "transaction":
        slot, action = step[1], step[2]
        con = run.held[slot]
        if action == "start":
            isolation = step[3] if len(step) > 3 else None
            if isolation == "read_only":
                transaction = con.transaction(readonly=True)
            else:
                transaction = con.transaction(isolation=isolation)
            run.transactions.append(transaction)
            await transaction.start()
            return con.is_in_transaction()
        if not run.transactions:
            return "no transaction"
        transaction = run.transactions.pop()
        await (transaction.commit() if action == "commit" else transaction.rollback())
        return con.is_in_transaction()
    if kind == "cursor":
        con = run.held[step[1]]
        cursor = await con.cursor("SELECT generate_series(1, 5)")
        run.cursors.append(cursor)
        return await cursor.fetch(2)
    if kind == "prepare":
        con = run.held[step[1]]
        statement = await con.prepare("SELECT $1::int * 3")
        run.statements.append(statement)
        return await (statement.fetchval(7) if step[2] == "fetchval" else statement.fetch(7))
    if kind == "args":
        con = run.held[step[1]]
        if step[2] == "fetchrow":
            return await con.fetchrow("SELECT $1::int + 1, $2::text, $3::json", 41, "x", '{"b": 1}')
        return await con.fetchval("SELECT $1::int * $2::int", 6, 7)
    if kind == "nested":
        # A transaction() inside another is a savepoint: the inner block's
        # error rolls back to it, the outer block commits.
        con = run.held[step[1]]
        async with con.transaction():
            await con.execute(UPDATE_ROW_4, 1)
            with contextlib.suppress(LookupError):
                async with con.transaction():
                    await con.execute(UPDATE_ROW_4, 1000)
                    raise LookupError("the inner block raised")
            return await con.fetchval(f"SELECT v FROM {TABLE} WHERE id = 4")
    if kind == "executemany_fail":
        # The second row's key exists: the batch fails half-way (and,
        # asyncpg's executemany being atomic, inserts nothing).
        con = run.held[step[1]]
        run.next_id += 1
        return await con.executemany(f"INSERT INTO {TABLE} (id, v) VALUES ($1, 0)", [(run.next_id,), (1,)])
    if kind == "prepare_after_failed":
        con = run.held[step[1]]
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            async with con.transaction():
                await con.execute("SELECT 1 / 0")
        statement = await con.prepare("SELECT generate_series(1, $1::int)")
        return await statement.fetch(2)
    if kind == "codec":
        # A codec set and dropped within the lease: it must not outlive it
        # (which backend a later lease gets would then matter).
        con = run.held[step[1]]
        await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        try:
            return await con.fetchval("""SELECT '{"c": 3}'::jsonb""")
        finally:
            await con.reset_type_codec("jsonb", schema="pg_catalog")
    if kind == "logged":
        return await logged_lease(run, step[1])
    if kind == "termination_listener":
        con = run.held[step[1]]
        con.add_termination_listener(lambda _con: run.callbacks.append("terminated"))
        return "added"
    if kind == "stale":
        what = step[1]
        if what == "proxy":
            return await run.released[-1].fetchval("SELECT 1") if run.released else "none"
        if what == "cursor":
            return await run.cursors[-1].fetch(1) if run.cursors else "none"
        if what == "statement":
            return await run.statements[-1].fetchval(1) if run.statements else "none"
        if not run.transactions:
            return "none"
        await run.transactions[-1].rollback()
        return "rolled back"
    if kind == "state":
        con = run.held[step[1]]
        return (con.is_in_transaction(), con.is_closed())
    if kind == "shortcut":
        method = step[1]
        if method == "fetchval":
            return await pool.fetchval("SELECT 40 + 2")
        if method == "execute":
            return await pool.execute(UPDATE_ROW_4, 100)
        if method == "executemany":
            return await pool.executemany(UPDATE_ROW_4, [(10,), (20,)])
        return await pool.fetch("SELECT generate_series(1, 2)")
    if kind == "expire":
        diverge(run, "expire_connections()")
        return await pool.expire_connections()
    if kind == "scoped":
        _, name, fail = step
        async with pool.acquire() as con:
            result = await con.execute(dict(STATEMENTS)[name])
            if fail:
                raise LookupError("the body of async with raised")
            return result
    if kind == "copy":
        con = run.held[step[1]]
        run.next_id += 1
        return await con.copy_records_to_table(TABLE, records=[(run.next_id, 7)])
    if kind == "executemany":
        con = run.held[step[1]]
        return await con.executemany(UPDATE_ROW_4, [(1,), (2,)])
    if kind == "listener":
        con = run.held[step[1]]
        await con.add_listener("parity_fuzz", _ignore)
        return "added"
    if kind == "log_listener":
        con = run.held[step[1]]
        con.add_log_listener(lambda _con, message: run.callbacks.append(f"log: {message.message}"))
        return "added"
    if kind == "cancel":
        # A statement cut short by the caller: asyncpg cancels it on the
        # server, and the release waits for the cancellation.
        con = run.held[step[1]]
        return await asyncio.wait_for(con.fetchval("SELECT pg_sleep(5)"), 0.02)
    if kind == "reset":
        return await run.held[step[1]].reset()
    if kind == "close":
        diverge(run, "a leased connection's close()")
        run.closed.add(step[1])
        return await run.held[step[1]].close()
    raise AssertionError(f"unknown step {step!r}")


async def logged_lease(run: Run, open_transaction: bool) -> list[str]:
    """``async with pool.acquire()`` with a query logger, maybe leaving a
    transaction open: the order in which the program's statements are
    logged and the open transaction is reported (asyncpg's pool reports it
    from its release task, after the queued log records). The logger stays
    on the connection (a reset does not remove it) but records nothing
    after this step; the reset's own statements are not recorded (safepool
    sends them as one: docs/migration.md)."""
    events: list[str] = []
    active = True

    def log(record: Any) -> None:
        if active and record.query in ("BEGIN", "SELECT 1"):
            events.append(f"logged {record.query}")

    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        events.append("reported")
        if handler is not None:
            handler(loop, context)

    loop.set_exception_handler(report)
    try:
        async with run.pool.acquire() as con:
            con.add_query_logger(log)
            if open_transaction:
                await con.execute("BEGIN")
            await con.execute("SELECT 1")
        # Compared as the release leaves them: its records delivered on
        # both pools (safepool's release takes a loop pass for a logger).
    finally:
        active = False
        loop.set_exception_handler(handler)
    if run.reports_differ:
        return [event for event in events if event != "reported"]
    return events


def _ignore(*_args: Any) -> None:
    return None


async def others_see(run: Run) -> tuple[Any, ...]:
    """What a session outside the pool sees: the advisory locks and open
    transactions of the pool's backends that are not leased (a leased one
    is the program's, and a statement it cancelled ends on the server in
    its own time), and whether the rows a lease may lock are free (row
    locks of leased connections included: they are taken NOWAIT, at once)."""
    held = set()
    for con in run.held:
        if con is not None:
            with contextlib.suppress(asyncpg.InterfaceError):  # closed by the program
                held.add(con.get_server_pid())
    pids = sorted(run.pids - held)
    locks = await run.admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = ANY($1::int[])", pids
    )
    in_transaction = await run.admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND state LIKE 'idle in transaction%'",
        pids,
    )
    free = []
    async with run.admin.transaction():
        for row in (1, 2, 3):
            try:
                async with run.admin.transaction():  # a savepoint: a refused lock ends only it
                    await run.admin.fetchval(f"SELECT id FROM {TABLE} WHERE id = $1 FOR UPDATE NOWAIT", row)
                free.append(True)
            except asyncpg.LockNotAvailableError:
                free.append(False)
    return ("advisory locks", locks, "in transaction", in_transaction, "rows free", tuple(free))


async def trace_on(
    factory: Callable[..., Any], dsn: str, program: list[tuple[Any, ...]], config: dict[str, str], **options: Any
) -> list[tuple[Any, ...]]:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v int NOT NULL);"
            f"INSERT INTO {TABLE} VALUES (1, 0), (2, 0), (3, 0), (4, 0);"
            f"CREATE SEQUENCE {SEQUENCE} START 100"
        )
        ObservedResetConnection.resets = []
        run = Run(None, admin, count_resets="connection_class" in config and "max_queries" not in config)
        options.update(pool_options(config, run))
        pool = run.pool = await factory(dsn, min_size=1, max_size=HANDLES, **options)
        try:
            if "max_queries" in config:
                # Both pools close a connection that reached max_queries on
                # release, but at different releases (asyncpg's reset
                # statements count, safepool's skipped resets do not), so the
                # pools diverge from the start, and the resets counted and the
                # open-transaction reports differ (a connection closed instead
                # is neither reset nor reported; others_see still checks that
                # no transaction outlives its lease).
                diverge(run, "max_queries=")
                run.reports_differ = True
            trace = await run_program(run, program)
            await asyncio.wait_for(pool.close(), 10)
            await asyncio.sleep(0)  # (the listeners' call_soon)
            trace.append(("closed", pool.get_size(), callbacks(run), "terminations counted", run.terminations))
            return trace
        finally:
            pool.terminate()
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {TABLE}; DROP SEQUENCE IF EXISTS {SEQUENCE}")
        await admin.close()


def first_difference(a: list[Any], b: list[Any]) -> int | None:
    for index, (left, right) in enumerate(zip(a, b, strict=False)):
        if left != right:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.mark.asyncio
@pytest.mark.parametrize(("options", "seed"), CASES)
async def test_random_program_same_on_both_pools(pg_dsn: str, options: str, seed: int) -> None:
    program = make_program(seed)
    config = make_config(seed)
    expected = await trace_on(asyncpg.create_pool, pg_dsn, program, config)
    actual = await trace_on(safepool.create_pool, pg_dsn, program, config, **OPTIONS[options])
    at = first_difference(expected, actual)
    if at is not None:
        lines = [
            f"seed {seed}, pool configuration {config}, safepool options {OPTIONS[options]}: "
            f"traces differ at entry {at}",
            "program:",
        ]
        lines += [f"  {i:3d} {step}" for i, step in enumerate(program)]
        lines.append("asyncpg's pool:")
        lines += [f"  {entry}" for entry in expected[max(0, at - 3) : at + 3]]
        lines.append(f"safepool ({options}):")
        lines += [f"  {entry}" for entry in actual[max(0, at - 3) : at + 3]]
        pytest.fail("\n".join(lines))


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
@pytest.mark.parametrize("seed", SEEDS[:20])
async def test_random_program_same_on_both_pools_when_tasks_start_eagerly(pg_dsn: str, seed: int) -> None:
    """The same programs on a loop whose task factory runs a new task's
    first step inside ``create_task()`` (``asyncio.eager_task_factory``):
    asyncpg's shielded release task, and every task either pool creates,
    starts at once there. (A review on Python 3.13 found the open-transaction
    report's order differing there; tests/compat/test_eager_tasks.py.)"""
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    probe = asyncio.sleep(0)
    try:
        await loop.create_task(probe)
    except TypeError:
        probe.close()  # (never started: no "never awaited" warning)
        # uvloop 0.23 on Python 3.13: its create_task() calls the factory
        # with eager_start=, which 3.13's eager_task_factory does not take.
        # On 3.12 uvloop runs the factory (its tasks start eagerly), so the
        # programs run on uvloop there too.
        loop.set_task_factory(factory)
        pytest.skip("asyncio.eager_task_factory does not run on this loop")
    try:
        program = make_program(seed)
        config = make_config(seed)
        expected = await trace_on(asyncpg.create_pool, pg_dsn, program, config)
        actual = await trace_on(safepool.create_pool, pg_dsn, program, config)
    finally:
        loop.set_task_factory(factory)
    at = first_difference(expected, actual)
    assert at is None, f"seed {seed}, {config}: traces differ at entry {at}: {expected[at:at + 3]} != {actual[at:at + 3]}"


def test_programs_cover_the_vocabulary() -> None:
    """The suite's 40 seeds reach every statement and every step kind (a program
    generator that stopped producing some would pass while testing less)."""
    kinds: set[str] = set()
    statements: set[str] = set()
    for seed in range(40):
        for step in make_program(seed):
            kinds.add(step[0])
            if step[0] == "sql":
                statements.add(step[2])
    assert statements == {name for name, _ in STATEMENTS}
    assert kinds == {"acquire", "release"} | {name for name, _ in ON_HELD}


def test_configurations_cover_every_choice() -> None:
    """The suite's 40 seeds draw every pool configuration choice, with
    every option also left out, and some seeds set none."""
    configs = [make_config(seed) for seed in range(40)]
    for option, choices, _ in CONFIG_CHOICES:
        assert {config.get(option) for config in configs} == {None, *choices}, option
    assert {} in configs
