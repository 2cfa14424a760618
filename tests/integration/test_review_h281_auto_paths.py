"""Review h281: ``reset_mode="auto"`` against ``"full"``, lease by lease, on a
real pool of one connection: each scenario runs in one lease through one of
the ways a lease sends SQL (every SQL method, prepared statements and
cursors used later, the COPY methods, ``setup=``, listeners, codecs,
transactions and savepoints, errors, cancels, pool shortcuts) and the next
lease of the same connection fingerprints the session as
test_autoreset_differential.py does. Auto mode must leave exactly what full
mode leaves (what asyncpg's reset query does not undo, a SQL-level PREPARE
or a SET ROLE, stays in both), and each scenario's statement must work the
same in both modes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from tests.integration.test_autoreset_differential import FINGERPRINT  # noqa: E402

pytestmark = pytest.mark.asyncio

Scenario = Callable[[Any, str], Awaitable[Any]]


@pytest_asyncio.fixture
async def schema(pg_dsn: str) -> AsyncIterator[str]:
    name = f"h281_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"""
            CREATE SCHEMA {name};
            CREATE TABLE {name}.t (id int PRIMARY KEY, a int, b text);
            INSERT INTO {name}.t VALUES (1, 1, 'one'), (2, 2, 'two');
            CREATE TABLE {name}.e (a int);
            CREATE TYPE {name}.mood AS ENUM ('sad', 'ok');
        """)
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await admin.close()


async def _quietly(awaitable: Awaitable[Any]) -> Any:
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return await awaitable


async def _prepared_later(con: Any, s: str) -> None:
    stmt = await con.prepare("SELECT pg_advisory_lock($1::bigint)")
    await con.fetchval("SELECT 1")
    await stmt.fetchval(2811)


async def _cursor(con: Any, s: str) -> None:
    async with con.transaction():
        async for _ in con.cursor("SELECT set_config('work_mem', '1811kB', false) FROM generate_series(1, 3)"):
            pass


async def _setup_scenario(con: Any, s: str) -> None:
    await con.fetchval("SELECT 1")


async def _listener(con: Any, s: str) -> None:
    def callback(*args: Any) -> None:
        pass

    await con.add_listener("h281_channel", callback)
    await con.execute("NOTIFY h281_channel")
    await con.remove_listener("h281_channel", callback)
    await con.execute("LISTEN h281_other")


async def _codec(con: Any, s: str) -> None:
    await con.set_type_codec("mood", schema=s, encoder=str, decoder=str, format="text")
    await con.fetchval(f"SELECT 'ok'::{s}.mood")


async def _transaction_options(con: Any, s: str) -> None:
    async with con.transaction(isolation="serializable", readonly=True, deferrable=True):
        await con.execute("SET LOCAL work_mem = '1812kB'")
        await con.execute("SELECT set_config('h281.x', 'y', true)")


async def _savepoint_set(con: Any, s: str) -> None:
    async with con.transaction():
        async with con.transaction():
            await con.execute("SET work_mem = '1813kB'")


async def _left_open(con: Any, s: str) -> None:
    tr = con.transaction()
    await tr.start()
    await con.execute("SET LOCAL work_mem = '1814kB'")
    await con.fetchval("SELECT pg_advisory_xact_lock(2812)")


async def _error_mid_string(con: Any, s: str) -> None:
    await _quietly(con.execute("SELECT pg_advisory_lock(2813); SELECT 1/0"))


async def _cancelled(con: Any, s: str) -> None:
    await _quietly(asyncio.wait_for(con.fetchval("SELECT pg_advisory_lock(2814), pg_sleep(5)"), 0.3))


async def _timeout_kw(con: Any, s: str) -> None:
    await _quietly(con.fetchval("SELECT pg_advisory_lock(2815), pg_sleep(5)", timeout=0.3))


async def _introspect_in_committed_xact(con: Any, s: str) -> None:
    async with con.transaction():
        await con.execute("SET LOCAL jit = off")
        await con.fetchval(f"SELECT $1::{s}.mood", "ok")


async def _copy_records(con: Any, s: str) -> None:
    await con.copy_records_to_table(
        "e", schema_name=s, records=[(1,)], where="pg_try_advisory_lock(2816) IS NOT NULL"
    )


async def _copy_from_query(con: Any, s: str) -> None:
    await con.copy_from_query(
        "SELECT * FROM pg_catalog.set_config('work_mem', '1815kB', false)", output=io.BytesIO()
    )


async def _pool_shortcut(con: Any, s: str) -> None:
    pass  # (run through the pool: see test below)


def _sql(method: str, sql: str, *args: Any) -> Scenario:
    async def run(con: Any, s: str) -> Any:
        if method == "fetchmany":
            return await _quietly(con.fetchmany(sql.format(s=s), [args]))
        if method == "executemany":
            return await _quietly(con.executemany(sql.format(s=s), [args]))
        return await _quietly(getattr(con, method)(sql.format(s=s), *args))

    run.__name__ = f"{method}: {sql[:60]}"
    return run


LONG = "SELECT 1 /*" + "x" * 17000 + "*/; SELECT pg_advisory_lock(2817)"

SCENARIOS: dict[str, Scenario] = {
    "execute second statement": _sql("execute", "SELECT 1; SET work_mem = '1801kB'"),
    "execute dollar-quoted": _sql("execute", "SELECT $x$;'$x$; /* ' */ SELECT pg_advisory_lock(2801) -- '"),
    "fetch schema-qualified": _sql("fetch", "SELECT pg_catalog.set_config('work_mem', '1802kB', false)"),
    "fetchval from function": _sql("fetchval", "SELECT * FROM set_config('work_mem', '1803kB', false)"),
    "fetchrow quoted": _sql("fetchrow", "SELECT \"set_config\"('work_mem', '1804kB', false)"),
    "fetchrow upper": _sql("fetchrow", "SELECT PG_CATALOG.SET_CONFIG('work_mem', '1805kB', false)"),
    "fetchmany args": _sql("fetchmany", "SELECT set_config('work_mem', $1, false)", "1806kB"),
    "executemany": _sql("executemany", "SELECT pg_advisory_lock($1::bigint)", 2802),
    "data-modifying CTE": _sql(
        "fetch", "WITH u AS (UPDATE {s}.t SET a = a WHERE id = 1 RETURNING pg_advisory_lock(2803)) SELECT * FROM u"
    ),
    "lateral": _sql("fetch", "SELECT * FROM {s}.t, LATERAL (SELECT set_config('work_mem', '1807kB', false)) AS l"),
    "scalar subquery": _sql("fetchval", "SELECT (SELECT set_config('work_mem', '1808kB', false))"),
    "where subquery": _sql("fetch", "SELECT 1 FROM {s}.t WHERE EXISTS (SELECT pg_advisory_lock(2804))"),
    "explain analyze": _sql("execute", "EXPLAIN ANALYZE SELECT pg_advisory_lock(2805)"),
    "select into": _sql("execute", "SELECT 1 AS a INTO TEMP h281_tmp"),
    "create table as": _sql("execute", "CREATE TEMP TABLE h281_tmp2 AS SELECT 1 AS a"),
    "long text": _sql("execute", LONG),
    "set local then commit": _sql("execute", "BEGIN; SET LOCAL work_mem = '1809kB'; COMMIT"),
    "set in committed block": _sql("execute", "BEGIN; SET work_mem = '1810kB'; COMMIT"),
    "listen": _sql("execute", "LISTEN h281_l"),
    "with hold cursor": _sql("execute", "BEGIN; DECLARE h281_c CURSOR WITH HOLD FOR SELECT 1; COMMIT"),
    "sql prepare": _sql("execute", "PREPARE h281_p AS SELECT 1"),
    "begin left open": _sql("execute", "BEGIN; SELECT pg_advisory_xact_lock(2806)"),
    "error in neutral": _sql("fetchval", "SELECT 1/0"),
    "prepared statement later": _prepared_later,
    "cursor": _cursor,
    "listener": _listener,
    "type codec": _codec,
    "transaction options": _transaction_options,
    "savepoint set": _savepoint_set,
    "transaction left open": _left_open,
    "error mid string": _error_mid_string,
    "cancelled": _cancelled,
    "timeout": _timeout_kw,
    "introspection in committed transaction": _introspect_in_committed_xact,
    "copy_records_to_table where": _copy_records,
    "copy_from_query": _copy_from_query,
}


async def _after(pg_dsn: str, schema: str, mode: str, scenario: Scenario, **kwargs: Any) -> dict[str, Any]:
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset_mode=mode,
        server_settings={"search_path": f"{schema}, public"}, **kwargs,
    )
    try:
        async with pool.acquire():  # (a connection's first lease always gets the full reset)
            pass
        async with pool.acquire() as con:
            pid = con.get_server_pid()
            await scenario(con, schema)
        async with pool.acquire() as con:
            assert con.get_server_pid() == pid
            fingerprint = dict(await con.fetchrow(FINGERPRINT))
            async with con.transaction():  # the next lease's transactions work
                fingerprint["works"] = await con.fetchval("SELECT count(*) FROM t")
        return fingerprint
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_auto_leaves_what_full_leaves(pg_dsn: str, schema: str, name: str) -> None:
    scenario = SCENARIOS[name]
    full = await _after(pg_dsn, schema, "full", scenario)
    auto = await _after(pg_dsn, schema, "auto", scenario)
    assert auto == full


async def test_setup_hook_statements(pg_dsn: str, schema: str) -> None:
    async def setup(con: Any) -> None:
        await con.execute("SELECT set_config('work_mem', '1816kB', false)")

    full = await _after(pg_dsn, schema, "full", _setup_scenario, setup=setup)
    auto = await _after(pg_dsn, schema, "auto", _setup_scenario, setup=setup)
    assert auto == full


async def test_pool_shortcut(pg_dsn: str, schema: str) -> None:
    results = []
    for mode in ("full", "auto"):
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
        try:
            async with pool.acquire():
                pass
            await pool.fetchval("SELECT pg_catalog.set_config('work_mem', '1817kB', false)")
            await pool.execute("SELECT pg_advisory_lock(2818)")
            async with pool.acquire() as con:
                results.append(dict(await con.fetchrow(FINGERPRINT)))
        finally:
            await asyncio.wait_for(pool.close(), 10)
    assert results[0] == results[1]
