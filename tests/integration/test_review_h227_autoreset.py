"""Review helper-227: reset_mode="auto" attacked for false neutrals on a real
server (a lease that leaves session state the next lease sees, where
asyncpg's full reset would have cleared it).

The classifier held for the SQL tried (quoted and qualified names,
set_config variants, attribute notation, SET LOCAL of role/session
authorization/time zone/placeholders, SET SESSION TRANSACTION, COMMIT AND
CHAIN, savepoints, data-modifying CTEs, MERGE, TABLESAMPLE, JSON_TABLE,
pg_settings reads and locks, NUL-truncated text). Two leaks are not in the
SQL the lease wrote, both fixed (proxy.watch and the other wrappers):

* asyncpg's own statements inside a call: its type introspection sends
  set_config('jit', ..., false); a call that counts more statements than
  its own now marks the lease for the full reset;
* a neutral statement whose task was created in the lease but first runs
  after the release (auto and rollback modes handed the connection on, and
  the statement ran on it): now refused at its start, nothing sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from safepool import _autoreset  # noqa: E402
from tests._util import reset_mode_pools, session_fingerprint  # noqa: E402

pytestmark = pytest.mark.asyncio

_fingerprint = session_fingerprint


@pytest_asyncio.fixture
async def make(pg_dsn: str, app_name: str) -> AsyncIterator[Callable[..., Any]]:
    async with reset_mode_pools(pg_dsn, {"application_name": app_name}) as factory:
        yield factory


@pytest.fixture(autouse=True)
def _fresh_cache() -> Any:
    _autoreset.cache_clear()
    yield
    _autoreset.cache_clear()


# ------------------------------------------------- a task not started yet

# Every statement of the string is neutral to the classifier.
SCHEDULED = "BEGIN; SET LOCAL work_mem = '2270kB'; SELECT pg_advisory_xact_lock(2270)"

# Full mode refuses the call at its start (its reset is under way), auto
# and rollback modes refuse it because its lease ended (proxy.watch).
NOT_STARTED_MODES = ["full", "auto", "rollback"]


@pytest.mark.parametrize("mode", NOT_STARTED_MODES)
async def test_neutral_statement_task_created_before_release_is_not_handed_on(make: Any, mode: str) -> None:
    pool = await make(mode)
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    async with pool.acquire() as con:
        # A fire-and-forget statement of the lease (a program bug): its task
        # is created in the lease and first runs after the release (no
        # await between the two).
        task = asyncio.ensure_future(con.execute(SCHEDULED))
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError):
        await task
    async with pool.acquire(timeout=10) as again:
        assert await _fingerprint(again) == default


@pytest.mark.parametrize("mode", NOT_STARTED_MODES)
async def test_neutral_statement_task_created_before_release_is_refused_at_its_start(make: Any, mode: str) -> None:
    """docs/migration.md: "a call whose coroutine has not started yet (created,
    then the lease released in the same step: safepool resets at once, and
    the call is refused at its start)"."""
    pool = await make(mode)
    async with pool.acquire() as con:
        task = asyncio.ensure_future(con.fetchval("SELECT 1"))
    with pytest.raises(asyncpg.InterfaceError):
        await task


# ------------------------------------------------ COPY strings of several statements

# asyncpg pastes where= into its COPY statement, sent as a simple query: the
# string may hold more statements, which the server runs after the COPY.
# Each is classified (a neutral one passes); the transaction they leave open
# is seen from the ReadyForQuery that ends the COPY, and rolled back.
COPY_WHERE = [
    "true; BEGIN; SET LOCAL work_mem = '2272kB'; NOTIFY h227",
    "true; BEGIN; SET LOCAL work_mem = '2272kB'; SELECT pg_advisory_xact_lock(2272)",
    "true; BEGIN; SET LOCAL work_mem = '2272kB'; COMMIT AND CHAIN",
]


@pytest.mark.parametrize("where", COPY_WHERE)
@pytest.mark.parametrize("method", ["copy_to_table", "copy_records_to_table"])
async def test_copy_where_of_several_statements_is_rolled_back(make: Any, pg_dsn: str, method: str, where: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS h227_copy (a int)")
    finally:
        await admin.close()
    pool = await make("auto")
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    async with pool.acquire() as con:
        if method == "copy_to_table":
            await con.copy_to_table("h227_copy", source=io.BytesIO(b"1\n"), where=where)
        else:
            await con.copy_records_to_table("h227_copy", records=[(1,)], where=where)
        assert con.is_in_transaction()  # the string's BEGIN
    async with pool.acquire(timeout=10) as again:
        assert await _fingerprint(again) == default


# ------------------------------------------- asyncpg's own statements in a call


@pytest_asyncio.fixture
async def mood(pg_dsn: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(
        "DROP TABLE IF EXISTS h227_moods; DROP TYPE IF EXISTS h227_mood; CREATE TYPE h227_mood AS ENUM ('calm', 'cross'); "
        "CREATE TABLE h227_moods (m h227_mood)"
    )
    try:
        yield "h227_mood"
    finally:
        await admin.execute("DROP TABLE IF EXISTS h227_moods; DROP TYPE IF EXISTS h227_mood")
        await admin.close()


# asyncpg's Connection._introspect_types (0.32) sends set_config('jit',
# 'off', false), its query, then set_config('jit', <before>, false): a
# session-level setting the classifier never sees. Full mode resets anyway;
# auto mode marks the lease from the statement count (proxy.watch).
INTROSPECTION_MODES = ["full", "auto"]


async def _in_transaction_with_jit_off(con: Any, mood: str) -> None:
    async with con.transaction():
        await con.execute("SET LOCAL jit = off")
        assert await con.fetchval(f"SELECT 'calm'::{mood}") == "calm"


async def _plain(con: Any, mood: str) -> None:
    assert await con.fetchval(f"SELECT 'calm'::{mood}") == "calm"


async def _argument(con: Any, mood: str) -> None:
    assert await con.fetchval(f"SELECT $1::{mood}::text", "cross") == "cross"


async def _copy_records(con: Any, mood: str) -> None:
    await con.copy_records_to_table("h227_moods", records=[("calm",)])


INTROSPECTING = {
    "copy_records_to_table into a table with an enum column": _copy_records,
    "SET LOCAL jit = off, then a fetchval of an enum, committed": _in_transaction_with_jit_off,
    "fetchval returning an enum": _plain,
    "fetchval with an enum argument": _argument,
}


@pytest.mark.parametrize("case", sorted(INTROSPECTING))
@pytest.mark.parametrize("mode", INTROSPECTION_MODES)
async def test_type_introspection_leaves_no_session_setting(make: Any, mood: str, mode: str, case: str) -> None:
    pool = await make(mode)
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    async with pool.acquire() as con:
        await INTROSPECTING[case](con, mood)
    async with pool.acquire() as again:
        assert await _fingerprint(again) == default


# ------------------------------------------------------------ a NUL in the text

# pglast reads the text as a C string: it stops at the first NUL, and so
# does the server (pq_getmsgstring), so both see the same statement. Pinned:
# what follows the NUL, classified by nobody, must not run.
NUL_TEXTS = {
    "execute": lambda con: con.execute("SELECT 1\x00; SELECT pg_advisory_lock(2273)"),
    "fetchval-with-argument": lambda con: con.fetchval("SELECT $1::int\x00; SELECT pg_advisory_lock(2273)", 1),
}


@pytest.mark.parametrize("call", sorted(NUL_TEXTS))
async def test_text_after_a_nul_does_not_run(make: Any, call: str) -> None:
    pool = await make("auto")
    async with pool.acquire() as con:
        default = await _fingerprint(con)
    async with pool.acquire() as con:
        # (The server refuses the message: the bytes after the NUL are
        # left over; the error marks the lease for the full reset anyway.)
        with contextlib.suppress(asyncpg.PostgresError):
            await NUL_TEXTS[call](con)
    async with pool.acquire() as again:
        assert await _fingerprint(again) == default
