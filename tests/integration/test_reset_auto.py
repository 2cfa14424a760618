"""reset_mode="auto" on a real server: a lease whose SQL could not change the
session is handed on with no reset round trip (ROLLBACK only when a
transaction is open); anything else gets asyncpg's full reset, so the next
lease sees what it would see on asyncpg's pool. The classifier itself is
tested in tests/unit/test_autoreset.py and, statement by statement against
session fingerprints, in test_autoreset_differential.py."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio

pytest.importorskip("pglast")


@pytest_asyncio.fixture
async def make(pg_dsn: str) -> AsyncIterator[Callable[..., Any]]:
    pools: list[safepool.Pool] = []

    async def factory(**kwargs: Any) -> safepool.Pool:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode="auto", **kwargs)
        pools.append(pool)
        # The first lease of a connection always resets (init= and connect
        # statements are invisible to the classifier): spend it.
        async with pool.acquire():
            pass
        return pool

    yield factory
    for pool in pools:
        pool._state.check_invariants()
        await asyncio.wait_for(pool.close(), 10)


async def test_reads_and_writes_skip_the_reset(make: Any) -> None:
    pool = await make()
    before = pool.stats()
    for _ in range(5):
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT count(*) FROM generate_series(1, $1::int)", 3) == 3
    after = pool.stats()
    assert after.resets - before.resets == 0
    assert after.resets_skipped - before.resets_skipped == 5


async def test_a_session_reading_strings_the_old_way_is_always_reset(make: Any) -> None:
    # With standard_conforming_strings off, a backslash in a string literal
    # escapes the quote: the parser (which reads them as "on") could take a
    # statement for a string. Every lease of such a session gets the reset.
    pool = await make(server_settings={"standard_conforming_strings": "off"})
    before = pool.stats()
    for _ in range(3):
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
    after = pool.stats()
    assert (after.resets - before.resets, after.resets_skipped - before.resets_skipped) == (3, 0)


@pytest.mark.parametrize(
    ("statement", "probe", "clean"),
    [
        ("SET application_name = 'auto-leak'", "SELECT current_setting('application_name')", ""),
        ("SELECT set_config('application_name', 'auto-leak', false)", "SELECT current_setting('application_name')", ""),
        ("SELECT pg_advisory_lock(4242)",
         "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", 0),
        ("LISTEN auto_channel", "SELECT count(*) FROM pg_listening_channels()", 0),
        ("PREPARE auto_stmt AS SELECT 1", "SELECT count(*) FROM pg_prepared_statements WHERE from_sql", None),
    ],
)
async def test_session_changes_are_reset(make: Any, statement: str, probe: str, clean: Any) -> None:
    pool = await make()
    async with pool.acquire() as con:
        expected = await con.fetchval(probe) if clean is None else clean
        await con.execute(statement)
    async with pool.acquire() as con:
        # PREPARE is not undone by asyncpg's reset query either (it has no
        # DEALLOCATE ALL): auto mode resets exactly as "full" does.
        got = await con.fetchval(probe)
    if clean is None:
        assert got == expected + 1
    else:
        assert got == clean, statement


async def test_a_statement_first_awaited_after_its_lease_is_refused_and_sends_nothing(make: Any) -> None:
    # A missing await: the coroutine of a statement made in one lease first
    # runs after that lease's release. It once ran on the connection there
    # (between leases, or in another lease), seen by no lease's proxy; now it
    # is refused as a call on the released proxy, for a session-changing
    # statement, a neutral one and a COPY alike (review h227).
    pool = await make()
    async with pool.acquire() as con:
        late = con.execute("SET application_name = 'auto-late'")
        neutral_late = con.execute("BEGIN; SELECT pg_advisory_xact_lock(4342)")
        copy_late = con.copy_from_query("SELECT pg_advisory_lock(4343)", output=io.BytesIO())
    for call, name in ((late, "execute"), (neutral_late, "execute"), (copy_late, "copy_from_query")):
        with pytest.raises(asyncpg.InterfaceError, match=rf"cannot call Connection\.{name}\(\): connection has been released"):
            await call
    async with pool.acquire() as con:
        assert not con.is_in_transaction()
        assert await con.fetchval("SELECT current_setting('application_name')") == ""
        assert await con.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ) == 0


async def test_an_open_transaction_gets_a_rollback_only(make: Any) -> None:
    pool = await make()
    async with pool.acquire() as con:
        await con.execute("SET application_name = 'kept'")  # a session change: full reset
    before = pool.stats()
    async with pool.acquire() as con:
        tx = con.transaction()
        await tx.start()
        await con.fetchval("SELECT 1")
        # released with the transaction open: asyncpg warns and rolls back
    async with pool.acquire() as con:
        assert not con.is_in_transaction()
    after = pool.stats()
    assert after.resets - before.resets == 1  # the ROLLBACK


async def test_methods_that_change_the_session_mark_the_lease(make: Any) -> None:
    pool = await make()
    with pytest.warns(asyncpg.InterfaceWarning, match="active notification listener"):  # asyncpg's own warning
        async with pool.acquire() as con:
            await con.add_listener("auto_cb", lambda *a: None)  # LISTEN runs inside asyncpg, past the proxy
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0


async def test_setup_statements_are_the_leases(make: Any) -> None:
    async def setup(con: Any) -> None:
        await con.execute("SET application_name = 'from-setup'")

    pool = await make(setup=setup)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == "from-setup"
    async with pool.acquire() as con:
        # setup ran again on this lease; the reset ran in between
        assert await con.fetchval("SELECT current_setting('application_name')") == "from-setup"
    assert pool.stats().resets >= 2


async def test_init_statements_are_reset_after_the_first_lease(pg_dsn: str) -> None:
    async def init(con: Any) -> None:
        await con.execute("SET application_name = 'from-init'")

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode="auto", init=init)
    try:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT current_setting('application_name')") == "from-init"
        async with pool.acquire() as con:
            # as on asyncpg's pool: its reset after every lease undoes init='s SET
            assert await con.fetchval("SELECT current_setting('application_name')") == ""
    finally:
        await pool.close()


async def test_a_taken_back_lease_gets_the_full_reset(make: Any) -> None:
    clock = safepool.ManualClock()
    pool = await make(lease_timeout=5.0, clock=clock)
    con = await pool.acquire()
    await con.fetchval("SELECT 1")  # neutral so far
    await con._raw.execute("SET application_name = 'behind-the-proxy'")  # type: ignore[union-attr]
    clock.advance(5.0)  # the lease expires; the take-back cannot trust the marks: full reset
    async with pool.acquire(timeout=10) as fresh:
        assert await fresh.fetchval("SELECT current_setting('application_name')") == ""
    assert pool.stats().leases_expired == 1
    await pool.release(con)


class _CountingReset(asyncpg.Connection):  # type: ignore[misc]
    """A reset query of its own: asyncpg's, then a sequence bump."""

    sequence = "reset_auto_count"

    def get_reset_query(self) -> str:
        return super().get_reset_query() + f"\nSELECT nextval('{self.sequence}');"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return super()._get_reset_query() + f"\nSELECT nextval('{self.sequence}');"


@pytest.mark.parametrize("mode", ["auto", "rollback"])
async def test_a_connection_class_reset_query_runs_after_every_lease(pg_dsn: str, mode: str) -> None:
    # docs/reset-modes.md: no mode skips your own reset code (asyncpg's pool
    # runs it after every lease).
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"DROP SEQUENCE IF EXISTS {_CountingReset.sequence}; CREATE SEQUENCE {_CountingReset.sequence}")
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset_mode=mode, connection_class=_CountingReset
    )
    try:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        before = await admin.fetchval(f"SELECT last_value FROM {_CountingReset.sequence}")
        for _ in range(3):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
        assert await admin.fetchval(f"SELECT last_value FROM {_CountingReset.sequence}") == before + 3
    finally:
        await pool.close()
        await admin.execute(f"DROP SEQUENCE {_CountingReset.sequence}")
        await admin.close()


class _TenantConnection(asyncpg.Connection):  # type: ignore[misc]
    async def set_tenant(self, tenant: str) -> None:
        # Runs on the connection itself: the proxy's classifier never sees it.
        await self.execute("SELECT set_config('application_name', $1, false)", tenant)


class _SettingFetch(asyncpg.Connection):  # type: ignore[misc]
    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        await self.execute("SET application_name = 'from-fetch'")
        return await super().fetch(query, *args, **kwargs)


@pytest.mark.parametrize(
    ("connection_class", "lease"),
    [
        (_TenantConnection, lambda con: con.set_tenant("tenant-42")),
        (_SettingFetch, lambda con: con.fetch("SELECT 1")),
    ],
)
async def test_a_connection_class_that_sends_sql_of_its_own_gets_the_reset(
    make: Any, connection_class: type, lease: Any
) -> None:
    pool = await make(connection_class=connection_class)
    async with pool.acquire() as con:
        await lease(con)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == ""


async def test_an_unknown_mode_is_a_clear_error(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="reset_mode"):
        await safepool.create_pool(pg_dsn, min_size=0, max_size=1, reset_mode="sometimes")


@pytest.mark.parametrize("mode", ["auto", "rollback"])
@pytest.mark.parametrize(("method", "args"), [("fetchval", ("SELECT 1",)), ("copy_from_query", ("SELECT 1",))])
async def test_a_call_never_awaited_warns_with_asyncpgs_name(
    pg_dsn: str, mode: str, method: str, args: tuple[Any, ...]
) -> None:
    """The proxy's wrapper coroutine takes asyncpg's method name (review
    h232): a call never awaited warns as on asyncpg's pool, so a warnings
    filter on that message still matches."""
    import gc
    import warnings

    pytest.importorskip("pglast")
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode) as pool:
        async with pool.acquire() as con:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kwargs = {"output": io.BytesIO()} if method.startswith("copy_") else {}
                call = getattr(con, method)(*args, **kwargs)
                del call
                gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        f"coroutine 'Connection.{method}' was never awaited"
    ]
