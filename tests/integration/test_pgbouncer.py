"""safepool through a real PgBouncer (transaction mode; one test in session mode).

Each test starts its own pgbouncer process on a free loopback port, in front
of the session's test server. Skipped, with the reason, when the pgbouncer
binary is absent (``apt-get install pgbouncer``; .ci/run installs it).

Findings, written up in docs/pgbouncer.md:

* ``statement_cache_size=0`` is required (asyncpg's named prepared
  statements do not survive transaction pooling on PgBouncer < 1.21);
* ``reset_mode="rollback"`` is the right reset: an open transaction must be
  rolled back on the same client connection (it pins a server connection
  until it ends), while the session reset of ``"full"`` runs as a separate
  transaction on whichever server connection PgBouncer picks, so it costs a
  round trip per lease and resets nothing useful;
* many pools (app processes) share one server budget: PgBouncer queues their
  transactions, the server never sees more than ``default_pool_size``;
* in session mode the session is real again: the full and auto resets
  matter, rollback hands session state on;
* ``python -m safepool top`` works through transaction mode (unnamed
  statements).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool
from tests._pgbouncer import Bouncer, requires_pgbouncer
from tests.faults._harness import Ledger, loop_errors

pytestmark = [pytest.mark.asyncio, requires_pgbouncer]

SERVER_ROLE = "bouncer_server"  # the role PgBouncer logs in with: counts its server connections


@pytest_asyncio.fixture
async def upstream(pg_dsn: str) -> AsyncIterator[dict[str, Any]]:
    """Where PgBouncer connects: the test server, as a dedicated role when
    it can be created (to count PgBouncer's server connections)."""
    con = await asyncpg.connect(pg_dsn)
    try:
        addr, params = con._addr, con._params
        if isinstance(addr, str):  # a Unix socket: .../.s.PGSQL.<port>
            host, port = os.path.dirname(addr), int(addr.rsplit(".", 1)[1])
        else:
            host, port = addr
        server_user = params.user
        try:
            exists = await con.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", SERVER_ROLE)
            if not exists:
                await con.execute(f"CREATE ROLE {SERVER_ROLE} LOGIN SUPERUSER")
            server_user = SERVER_ROLE
        except asyncpg.InsufficientPrivilegeError:
            pass
        yield {
            "host": host, "port": port, "database": params.database, "user": params.user,
            "password": params.password, "server_user": server_user,
        }
    finally:
        await con.close()


@pytest.fixture
def start_bouncer(upstream: dict[str, Any]) -> Iterator[Callable[..., Bouncer]]:
    bouncers: list[Bouncer] = []
    roots: list[str] = []

    def start(**settings: Any) -> Bouncer:
        root = tempfile.mkdtemp(prefix="safepool-pgbouncer-")
        os.chmod(root, 0o755)
        roots.append(root)
        bouncer = Bouncer(upstream, Path(root), **settings)
        bouncer.start()
        bouncers.append(bouncer)
        return bouncer

    yield start
    for bouncer in bouncers:
        bouncer.stop()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture
async def server_connections(pg_dsn: str, upstream: dict[str, Any]) -> AsyncIterator[Callable[[], Any]]:
    """``await server_connections()``: PgBouncer's connections to the server."""
    if upstream["server_user"] != SERVER_ROLE:
        pytest.skip(f"cannot create role {SERVER_ROLE} on the test server to count PgBouncer's connections")
    admin = await asyncpg.connect(pg_dsn)

    async def count() -> int:
        return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", SERVER_ROLE))

    try:
        yield count
    finally:
        await admin.close()


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("reset_mode", ["rollback", "full", "auto"])
async def test_pool_works_through_pgbouncer_transaction_mode(
    start_bouncer: Callable[..., Bouncer], reset_mode: str
) -> None:
    if reset_mode == "auto":
        pytest.importorskip("pglast")
    bouncer = start_bouncer(default_pool_size=3)
    pool = await safepool.create_pool(
        bouncer.dsn(), min_size=2, max_size=8, statement_cache_size=0, reset_mode=reset_mode,
    )
    ledger = Ledger()

    async def client(i: int) -> None:
        for j in range(15):
            try:
                async with pool.acquire() as con:
                    assert await con.fetchval("SELECT $1::int * 2", i * 100 + j) == 2 * (i * 100 + j)
                    async with con.transaction():
                        rows = await con.fetch("SELECT g FROM generate_series(1, $1::int) g", j + 1)
                        assert [r["g"] for r in rows] == list(range(1, j + 2))
                    await con.executemany("SELECT $1::text", [(str(k),) for k in range(3)])
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)

    try:
        with loop_errors() as unhandled:
            async with asyncio.timeout(60):
                await asyncio.gather(*(client(i) for i in range(24)))
        assert not unhandled, unhandled
    finally:
        await asyncio.wait_for(pool.close(), 10)
    ledger.check()
    assert ledger.ok == 24 * 15, ledger.summary()
    stats = pool.stats()
    print({"reset_mode": reset_mode, "resets": stats.resets, "resets_skipped": stats.resets_skipped,
           "acquired": stats.acquired})
    if reset_mode == "rollback":
        assert stats.resets == 0  # no open transaction was left: nothing to send
    elif reset_mode == "auto":
        # Nothing changed the session: only each new connection's first
        # lease is reset (docs/reset-modes.md).
        assert stats.resets <= stats.connections_opened, stats
    else:
        assert stats.resets > 0  # a round trip per lease, on whatever server connection


async def test_rollback_mode_ends_open_transactions_so_pgbouncer_unpins(
    start_bouncer: Callable[..., Bouncer],
) -> None:
    """A lease released inside BEGIN pins a PgBouncer server connection until
    the transaction ends. With two server connections and four pool
    connections, twenty such leases would wedge everything unless the pool
    rolls back on the same client connection."""
    bouncer = start_bouncer(default_pool_size=2, query_wait_timeout=5)
    pool = await safepool.create_pool(
        bouncer.dsn(), min_size=4, max_size=4, statement_cache_size=0, reset_mode="rollback",
    )
    try:
        with loop_errors(allow=lambda ctx: "active transaction" in str(ctx.get("message"))) as unhandled:
            async with asyncio.timeout(20):
                await pool.execute("CREATE TABLE IF NOT EXISTS sp_bouncer_t (x int)")
                await pool.execute("TRUNCATE sp_bouncer_t")
                for _ in range(20):
                    async with pool.acquire() as con:
                        await con.execute("BEGIN")
                        await con.execute("INSERT INTO sp_bouncer_t VALUES (1)")
                        # released without COMMIT
                assert await pool.fetchval("SELECT count(*) FROM sp_bouncer_t") == 0
                await pool.execute("DROP TABLE sp_bouncer_t")
        assert not unhandled, unhandled
        assert pool.stats().resets == 20
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_many_pools_share_one_server_budget(
    start_bouncer: Callable[..., Bouncer], server_connections: Callable[[], Any]
) -> None:
    """Three pools (three app processes) of max_size 5 each behind one
    PgBouncer with default_pool_size 4: the server never sees more than 4
    connections, and every transaction completes (PgBouncer queues them)."""
    bouncer = start_bouncer(default_pool_size=4, max_client_conn=20)
    pools = [
        await safepool.create_pool(
            bouncer.dsn(), min_size=1, max_size=5, statement_cache_size=0, reset_mode="rollback",
        )
        for _ in range(3)
    ]
    samples: list[int] = []
    ledger = Ledger()
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(await server_connections())
            await asyncio.sleep(0.02)

    async def client(pool: safepool.Pool) -> None:
        for _ in range(20):
            try:
                async with pool.acquire() as con, con.transaction():
                    await con.execute("SELECT pg_sleep(0.005)")
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)

    try:
        sampler = asyncio.create_task(sample())
        async with asyncio.timeout(60):
            await asyncio.gather(*(client(pools[i % 3]) for i in range(30)))
        stop.set()
        await sampler
    finally:
        for pool in pools:
            await asyncio.wait_for(pool.close(), 10)
    ledger.check()
    assert ledger.ok == 600, ledger.summary()
    assert samples and max(samples) <= 4, samples
    print({"client_connections": sum(p.stats().max_size for p in pools), "max_server_connections": max(samples)})


async def test_pgbouncer_client_limit_degrades_the_pools_without_failing_callers(
    start_bouncer: Callable[..., Bouncer],
) -> None:
    """max_size x processes above PgBouncer's max_client_conn: with
    wait_on_connect_error=True the pools that cannot grow keep serving with
    the connections they have."""
    bouncer = start_bouncer(default_pool_size=4, max_client_conn=6)
    pools = [
        await safepool.create_pool(
            bouncer.dsn(), min_size=1, max_size=5, statement_cache_size=0, reset_mode="rollback",
            acquire_timeout=10, wait_on_connect_error=True,
        )
        for _ in range(3)
    ]
    ledger = Ledger()

    async def client(pool: safepool.Pool) -> None:
        for _ in range(20):
            try:
                async with pool.acquire() as con:
                    await con.execute("SELECT pg_sleep(0.005)")
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)

    try:
        with loop_errors() as unhandled:
            async with asyncio.timeout(60):
                await asyncio.gather(*(client(pools[i % 3]) for i in range(30)))
        assert not unhandled, unhandled
        sizes = [p.get_size() for p in pools]
        connect_errors = sum(p.stats().connect_errors for p in pools)
    finally:
        for pool in pools:
            await asyncio.wait_for(pool.close(), 10)
    ledger.check()
    print({"sizes": sizes, "connect_errors": connect_errors, "ledger": ledger.summary()})
    assert sum(sizes) <= 6
    assert connect_errors > 0
    assert ledger.ok == 600, ledger.summary()


@pytest.mark.parametrize("reset_mode", ["full", "auto", "rollback"])
async def test_session_mode_keeps_the_session_so_the_reset_matters(
    start_bouncer: Callable[..., Bouncer], reset_mode: str
) -> None:
    """PgBouncer in session mode: a pool connection keeps its server
    connection, so session state is real, as on a direct connection. The
    full and auto resets clear a lease's SET and advisory lock before the
    next lease; rollback hands them on (docs/pgbouncer.md, Session mode)."""
    if reset_mode == "auto":
        pytest.importorskip("pglast")
    bouncer = start_bouncer(pool_mode="session", default_pool_size=2)
    pool = await safepool.create_pool(bouncer.dsn(), min_size=1, max_size=1, reset_mode=reset_mode)
    try:
        async with asyncio.timeout(20):
            async with pool.acquire() as con:
                await con.execute("SET application_name = 'sp-session-leak'")
                await con.execute("SELECT pg_advisory_lock(83083)")
                await con.prepare("SELECT 1")  # a named statement, kept by the session
            async with pool.acquire() as con:
                name = await con.fetchval("SHOW application_name")
                locks = await con.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 83083 "
                    "AND pid = pg_backend_pid()"
                )
                await con.execute("SELECT pg_advisory_unlock_all()")
    finally:
        await asyncio.wait_for(pool.close(), 10)
    if reset_mode == "rollback":
        assert (name, locks) == ("sp-session-leak", 1)
    else:
        assert (name, locks) == ("", 0)


async def test_idle_connections_pgbouncer_drops_are_replaced_without_an_error(
    start_bouncer: Callable[..., Bouncer],
) -> None:
    """PgBouncer's client_idle_timeout closes idle pool connections: the pool
    sees the close, replaces them, and the next users get no error
    (docs/pgbouncer.md, client_idle_timeout)."""
    bouncer = start_bouncer(default_pool_size=2, client_idle_timeout=1)
    pool = await safepool.create_pool(
        bouncer.dsn(), min_size=2, max_size=2, statement_cache_size=0, reset_mode="rollback",
    )
    try:
        async with asyncio.timeout(20):
            while pool.stats().connections_closed < 2:  # PgBouncer dropped both idle connections
                await asyncio.sleep(0.05)
            assert [await pool.fetchval("SELECT $1::int", i) for i in range(6)] == list(range(6))
        stats = pool.stats()
        assert stats.connections_opened >= 4, stats
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_top_works_through_pgbouncer_transaction_mode(start_bouncer: Callable[..., Bouncer]) -> None:
    """``python -m safepool top`` pointed at PgBouncer in transaction mode:
    each run is a new process and a new client, but the server connection
    (one here) keeps the named statements an earlier client prepared, and
    asyncpg numbers them per process. With asyncpg's statement cache the
    second run's first query collided with the first run's (``prepared
    statement "__asyncpg_stmt_1__" already exists``, exit 2); top's queries
    must use unnamed statements. (Processes, not ``main()`` in this one:
    the numbering would differ.)"""
    bouncer = start_bouncer(default_pool_size=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(safepool.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    for _ in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "safepool", "top", "--json", "--once", bouncer.dsn(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert (proc.returncode, err.decode()) == (0, "")
        assert b'"total": ' in out


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
async def test_the_replay_refuses_a_dsn_through_transaction_pooling(
    start_bouncer: Callable[..., Bouncer], pool_mode: str
) -> None:
    """Through transaction pooling the replay's pools (asyncpg's statement
    cache on) fail their queries with prepared-statement errors and the
    comparison means nothing (docs/replay.md): ``--dsn`` is refused with
    one line and exit status 2, before any pool runs."""
    bouncer = start_bouncer(pool_mode=pool_mode, default_pool_size=4)
    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "safepool", "replay", "--dsn", bouncer.dsn(), "--scenario", "leak",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await replay.communicate()
    assert replay.returncode == 2, err
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "connection pooler in transaction mode" in lines[0], lines


@pytest.mark.parametrize("pool_mode", ["session", "direct"])
async def test_the_replay_takes_postgresql_or_a_session_mode_pooler(
    start_bouncer: Callable[..., Bouncer], pg_dsn: str, pool_mode: str
) -> None:
    from safepool.replay.server import connect_monitor

    dsn = pg_dsn if pool_mode == "direct" else start_bouncer(pool_mode="session", default_pool_size=4).dsn()
    con, max_connections = await connect_monitor(dsn, pool_size=2, from_option=True)
    try:
        assert max_connections > 2
    finally:
        await con.close()
