"""Review helper-204: reset_mode="auto" looked for false neutrals, a lease
the pool hands on without the full reset while its session was changed.

The classifier itself held: every statement tried here that can change the
session was marked (schema-qualified and quoted advisory-lock calls,
set_config() in FROM / LATERAL / a sublink, calls in LIMIT, VALUES, ROWS
FROM, EXPLAIN ANALYZE, attribute notation on a function's scalar row, an
UPDATE of pg_catalog.pg_settings, SELECT INTO on a UNION's first SELECT,
SET LOCAL NAMES / SCHEMA, a mixed-case 'Search_Path'), and every neutral
one left nothing behind on a real server. Those are kept below as
regression tests, end to end through a pool (max_size=1: the next lease
gets the same backend).

What did not hold is the release of a lease whose own statement still runs
in another task (docs/migration.md: "both pools raise InterfaceError"):
full mode sends the reset, which is refused, and gives the connection up;
auto (and rollback) mode saw an unmarked lease, sent nothing, and handed the
connection on with the statement running, so the next lease ended up inside
the transaction that statement opened, with its SET LOCAL values and its
transaction-level advisory lock (or, released in the loop step that cancels
the statement, with its aborted transaction or "another operation is in
progress"). Fixed in s65: proxy.watch counts its statements under way on the
holder, and a release while one runs marks the lease (the full mode's reset,
or the rollback mode's ROLLBACK, goes as in full mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from safepool import _autoreset  # noqa: E402
from tests._util import reset_mode_pools, session_fingerprint, until_in_pg_sleep  # noqa: E402

pytestmark = pytest.mark.asyncio

_fingerprint = session_fingerprint


@pytest_asyncio.fixture
async def schema(pg_dsn: str) -> AsyncIterator[str]:
    name = f"h204_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"""
            CREATE SCHEMA {name};
            CREATE TABLE {name}.t (id int PRIMARY KEY, a int, b text);
            INSERT INTO {name}.t VALUES (1, 1, 'one'), (2, 2, 'two');
            CREATE SEQUENCE {name}.s;
            -- a user now() beside pg_catalog's: pg_catalog is searched first
            -- (implicitly, when the search_path does not name it)
            CREATE FUNCTION {name}.now() RETURNS timestamptz LANGUAGE sql
                AS $$ SELECT set_config('h204.shadow', 'called', false)::text::timestamptz $$;
        """)
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await admin.close()


@pytest_asyncio.fixture
async def make(pg_dsn: str, schema: str, app_name: str) -> AsyncIterator[Callable[..., Any]]:
    async with reset_mode_pools(pg_dsn, {"search_path": f"{schema}, public", "application_name": app_name}) as factory:
        yield factory


@pytest.fixture(autouse=True)
def _fresh_cache() -> Any:
    _autoreset.cache_clear()
    yield
    _autoreset.cache_clear()


# ------------------------------------------------------ the false neutral


RESET_MODES = ["full", "auto", "rollback"]


@pytest.mark.parametrize("mode", RESET_MODES)
async def test_release_while_the_leases_neutral_statement_runs_hands_on_a_clean_session(
    make: Any, pg_dsn: str, mode: str
) -> None:
    pool = await make(mode)
    statement: asyncio.Future[Any] | None = None
    try:
        async with pool.acquire() as con:
            default = await _fingerprint(con)
        with contextlib.suppress(asyncpg.InterfaceError):
            async with pool.acquire() as con:
                # Every statement of the string is neutral to the classifier.
                statement = asyncio.ensure_future(
                    con.execute(
                        "BEGIN; SET LOCAL work_mem = '1234kB'; SELECT pg_advisory_xact_lock(4204); SELECT pg_sleep(0.3)"
                    )
                )
                await until_in_pg_sleep(pg_dsn, con.get_server_pid(), 10)
                # The lease ends (a program bug: the statement's task still runs).
        async with pool.acquire(timeout=10) as again:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await statement  # ended: returned (auto, rollback) or cancelled (full)
            assert await _fingerprint(again) == default
    finally:
        if statement is not None and not statement.done():
            statement.cancel()
            with contextlib.suppress(BaseException):
                await statement


@pytest.mark.parametrize("mode", RESET_MODES)
async def test_release_in_the_step_that_cancels_the_leases_neutral_statement(make: Any, pg_dsn: str, mode: str) -> None:
    pool = await make(mode)
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    con = await pool.acquire()
    pid = con.get_server_pid()
    task = asyncio.ensure_future(con.execute("BEGIN; SET LOCAL work_mem = '1234kB'; SELECT pg_sleep(10)"))
    await until_in_pg_sleep(pg_dsn, pid, 10)
    task.cancel()
    await pool.release(con)
    with pytest.raises(asyncio.CancelledError):
        await task
    async with pool.acquire(timeout=10) as again:
        assert again.get_server_pid() == pid  # kept, as on asyncpg's pool
        assert await _fingerprint(again) == default


@pytest.mark.parametrize("mode", RESET_MODES)
async def test_release_in_the_step_that_cancels_a_plain_neutral_statement_hands_on_a_usable_connection(
    make: Any, pg_dsn: str, mode: str
) -> None:
    pool = await make(mode)
    con = await pool.acquire()
    task = asyncio.ensure_future(con.execute("SELECT pg_sleep(10)"))
    await until_in_pg_sleep(pg_dsn, con.get_server_pid(), 10)
    task.cancel()
    await pool.release(con)
    try:
        async with pool.acquire(timeout=10) as again:
            assert await again.fetchval("SELECT 1") == 1
    finally:
        with contextlib.suppress(BaseException):
            await task


# s65: the same kind through each call shape a watched statement takes: the
# extended protocol (arguments: asyncpg's statement section between its
# steps), executemany, and a statement left running by wait_for(shield()).
IN_FLIGHT = {
    "fetchval-with-arguments": lambda con: con.fetchval(
        "SELECT pg_advisory_xact_lock(4205) FROM (SELECT set_config('work_mem', '1234kB', true), pg_sleep($1)) AS s",
        0.3,
    ),
    "executemany": lambda con: con.executemany("SELECT set_config('work_mem', '1234kB', true), pg_sleep($1)", [(0.3,)]),
    "execute-in-a-transaction-string": lambda con: con.execute(
        "BEGIN; SET LOCAL work_mem = '1234kB'; SELECT pg_sleep(0.3)"
    ),
}


@pytest.mark.parametrize("mode", ["auto", "rollback"])
@pytest.mark.parametrize("shape", sorted(IN_FLIGHT))
async def test_a_lease_released_with_a_statement_under_way_hands_on_a_clean_usable_session(
    make: Any, pg_dsn: str, mode: str, shape: str
) -> None:
    pool = await make(mode)
    statement: asyncio.Future[Any] | None = None
    try:
        async with pool.acquire() as con:
            default = await _fingerprint(con)
        with contextlib.suppress(asyncpg.InterfaceError):
            async with pool.acquire() as con:
                statement = asyncio.ensure_future(IN_FLIGHT[shape](con))
                await until_in_pg_sleep(pg_dsn, con.get_server_pid(), 10)
        async with pool.acquire(timeout=10) as again:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await statement
            assert await again.fetchval("SELECT 1") == 1
            assert await _fingerprint(again) == default
    finally:
        if statement is not None and not statement.done():
            statement.cancel()
            with contextlib.suppress(BaseException):
                await statement


@pytest.mark.parametrize("mode", ["auto", "rollback"])
async def test_a_statement_left_running_by_wait_for_shield_is_not_handed_on(make: Any, pg_dsn: str, mode: str) -> None:
    pool = await make(mode)
    inner: asyncio.Future[Any] | None = None
    try:
        async with pool.acquire() as con:
            default = await _fingerprint(con)
        with contextlib.suppress(asyncpg.InterfaceError):
            async with pool.acquire() as con:
                inner = asyncio.ensure_future(con.execute("BEGIN; SET LOCAL work_mem = '1234kB'; SELECT pg_sleep(0.3)"))
                await until_in_pg_sleep(pg_dsn, con.get_server_pid(), 10)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(inner), 0.001)
        async with pool.acquire(timeout=10) as again:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                await inner
            assert await _fingerprint(again) == default
    finally:
        if inner is not None and not inner.done():
            inner.cancel()
            with contextlib.suppress(BaseException):
                await inner


async def test_watch_counts_its_statement_until_it_ends() -> None:
    from types import SimpleNamespace

    from safepool.proxy import watch

    holder = SimpleNamespace(watched=0, clean_mark=5)
    protocol = SimpleNamespace(queries_count=0)

    class Connection:
        _protocol = protocol

        async def fetchval(self, fail: bool, counts: int = 1) -> int:
            assert holder.watched == 1
            protocol.queries_count += counts
            if fail:
                raise ValueError("refused")
            return 7

    proxy = SimpleNamespace(_raw=Connection(), _holder=holder)
    assert await watch(proxy, "fetchval", (False,), {}) == 7
    assert (holder.watched, holder.clean_mark) == (0, 5)
    with pytest.raises(ValueError):
        await watch(proxy, "fetchval", (True,), {})
    assert (holder.watched, holder.clean_mark) == (0, -1)
    # More statements than its own (asyncpg's type introspection): marked.
    holder.clean_mark = 5
    assert await watch(proxy, "fetchval", (False,), {"counts": 2}) == 7
    assert (holder.watched, holder.clean_mark) == (0, -1)


# ------------------------------------------- what held: session changers


# Statements that change the session in ways the classifier must see;
# each gets the full reset, so the next lease's fingerprint is the default.
MARKED = [
    "SELECT * FROM set_config('work_mem', '1MB', false)",
    "SELECT x FROM LATERAL pg_catalog.set_config('work_mem', '2MB', false) AS x",
    "SELECT 1 FROM t WHERE (SELECT set_config('work_mem', '5MB', false)) IS NOT NULL",
    'SELECT "pg_advisory_lock"(1)',
    "SELECT pg_catalog.pg_advisory_lock(2)",
    "SELECT 1 LIMIT (SELECT count(*) FROM (SELECT pg_advisory_lock(3)) AS x)",
    "SELECT 1 ORDER BY (SELECT pg_try_advisory_lock(4))",
    "VALUES (pg_advisory_lock(5))",
    "SELECT * FROM ROWS FROM (pg_advisory_lock(6))",
    "SELECT * FROM t, LATERAL (SELECT pg_try_advisory_lock(t.id + 100)) AS x",
    "EXPLAIN ANALYZE SELECT pg_advisory_lock(7)",
    "WITH x AS MATERIALIZED (SELECT pg_advisory_lock(8)) SELECT * FROM x",
    "SELECT g.pg_advisory_lock FROM generate_series(9::bigint, 9) AS g",  # attribute notation
    "UPDATE pg_catalog.pg_settings SET setting = '4MB' WHERE name = 'work_mem'",
    "EXPLAIN (ANALYZE, COSTS OFF) UPDATE pg_settings AS s SET setting = '3MB' WHERE s.name = 'work_mem'",
    "SELECT 1; LISTEN h204_channel; SELECT 2",
    "BEGIN; DECLARE h204_c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    "SELECT 1 /* ; */; SET work_mem = '7MB'",
    "SELECT $q$ ; $q$; SET work_mem = '8MB'",
]


@pytest.mark.parametrize("sql", MARKED)
async def test_session_changers_are_marked_and_reset(make: Any, sql: str) -> None:
    assert _autoreset.reset_reason(sql) is not None
    pool = await make()
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    async with pool.acquire() as con:
        await con.execute(sql)
        assert await _fingerprint(con) != default  # the statement did change the session
    async with pool.acquire() as con:
        assert await _fingerprint(con) == default


@pytest.mark.parametrize(
    "sql",
    [
        # SELECT INTO on the leftmost SELECT of a set operation is the statement's.
        "SELECT 1 AS x INTO TEMP TABLE h204_tmp UNION ALL SELECT 2",
        "SET LOCAL NAMES 'SQL_ASCII'",  # client_encoding
        "SET LOCAL SCHEMA 'pg_catalog'",  # search_path
        "SELECT set_config('Search_Path', 'pg_catalog', true)",  # GUC names are case-insensitive
        "SELECT set_config('work_mem', '1MB', true::boolean)",
        "SELECT set_config('work_mem'::text, '1MB', true)",
        "SELECT set_config('work_mem', '6MB', is_local => true)",  # named: not read, so marked
        "SET LOCAL SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT lo_creat(-1)",
        "SELECT (1::bigint).pg_advisory_lock",
        "COPY (SELECT 1) TO PROGRAM 'cat'",
        "SELECT pg_catalog.xmlexists('//a' PASSING '<a/>')",
        "PREPARE TRANSACTION 'h204'",
    ],
)
async def test_classified_as_changing(sql: str) -> None:
    assert _autoreset.reset_reason(sql) is not None


# ------------------------------------------------ what held: neutrals


# Neutral to the classifier and, on a real server, leaving nothing for the
# next lease (an open transaction gets the pool's ROLLBACK).
NEUTRAL = [
    "BEGIN; SET LOCAL work_mem = '3MB'; COMMIT AND CHAIN",
    "BEGIN; SELECT pg_advisory_xact_lock(10); SAVEPOINT a; RELEASE a",
    "BEGIN; SET LOCAL work_mem = '3MB'; SELECT pg_advisory_xact_lock(11)",
    "SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "BEGIN; SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE; COMMIT",
    "BEGIN; SET LOCAL default_transaction_isolation = 'serializable'; COMMIT AND CHAIN; COMMIT",
    "BEGIN; SET LOCAL SESSION AUTHORIZATION DEFAULT; COMMIT",
    "BEGIN; SET LOCAL ROLE NONE; COMMIT",
    "SET LOCAL TIME ZONE 'UTC'",
    "SET LOCAL XML OPTION DOCUMENT",
    "SELECT * FROM pg_catalog.set_config('work_mem', '1MB', true)",
    "SELECT set_config('role', current_user::text, true)",
    "SELECT 1 FROM pg_settings FOR UPDATE",
    "SELECT 1 FROM t FOR UPDATE OF t NOWAIT",
    "START TRANSACTION; LOCK TABLE t",
    "SELECT pg_advisory_xact_lock(12)",
    "SELECT pg_notify('h204', 'x')",
    "NOTIFY h204",
    "SELECT 1; COMMIT; SELECT 2",
    # A user now() in a schema of the search_path: pg_catalog's is found
    # first, so the classifier's trust in the name holds here.
    "SELECT now()",
    "SELECT count(*) FROM t WHERE b = ANY ('{one}')",
    # Text that merely looks like session changes.
    "SELECT 'SET work_mem = 1; LISTEN x' AS a, $$ SELECT pg_advisory_lock(1) $$ AS b /* SET work_mem = 2 */",
    "SELECT 1 -- ; SET work_mem = '9MB'",
]


@pytest.mark.parametrize("sql", NEUTRAL)
async def test_neutral_statements_leave_nothing(make: Any, sql: str) -> None:
    assert _autoreset.reset_reason(sql) is None
    pool = await make()
    async with pool.acquire() as con:
        default = await _fingerprint(con)
        default_shadow = await con.fetchval("SELECT current_setting('h204.shadow', true)")
    async with pool.acquire() as con:
        await con.execute(sql)
    async with pool.acquire() as con:
        assert await _fingerprint(con) == default
        assert await con.fetchval("SELECT current_setting('h204.shadow', true)") == default_shadow


async def test_neutral_copy_from_query(make: Any) -> None:
    pool = await make()
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    before = pool.stats()
    async with pool.acquire() as con:
        await con.copy_from_query("SELECT id, lower(b) FROM t FOR UPDATE", output=io.BytesIO())
    assert pool.stats().resets_skipped - before.resets_skipped == 1
    async with pool.acquire() as con:
        assert await _fingerprint(con) == default


async def test_a_nul_character_hides_nothing(make: Any) -> None:
    # pglast reads the text up to the NUL (neutral: "SELECT 1"); the server
    # refuses the message (ProtocolViolationError), and the error marks the
    # lease. Nothing after the NUL runs.
    sql = "SELECT 1\x00; SELECT pg_advisory_lock(13)"
    assert _autoreset.reset_reason(sql) is None
    pool = await make()
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    for method in ("execute", "fetchval"):
        async with pool.acquire() as con:
            with pytest.raises(asyncpg.PostgresError):
                await getattr(con, method)(sql)
            assert await _fingerprint(con) == default
    async with pool.acquire() as con:
        assert await _fingerprint(con) == default


async def test_a_prepared_statement_of_an_earlier_lease_is_refused(make: Any) -> None:
    # prepare() marks its lease; the statement object cannot be run in a
    # later lease, where the proxy would not see it (asyncpg's release counter).
    pool = await make()
    async with pool.acquire() as con:
        default = await _fingerprint(con)
        stmt = await con.prepare("SELECT pg_advisory_lock(14)")
    async with pool.acquire() as con:
        with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
            await stmt.fetchval()
    async with pool.acquire() as con:
        assert await _fingerprint(con) == default


@pytest.mark.parametrize("mode", ["auto", "full"])
async def test_sequence_state_is_kept_by_both_modes(make: Any, mode: str) -> None:
    # docs/reset-modes.md: nextval() is neutral, as asyncpg's reset query
    # does not clear currval()/lastval() either. The next lease reads the
    # previous lease's lastval() in both modes (a documented leak, not auto's).
    pool = await make(mode)
    async with pool.acquire() as con:
        value = await con.fetchval("SELECT nextval('s')")
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT lastval()") == value
