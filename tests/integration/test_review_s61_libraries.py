"""Review s61: safepool as a drop-in under third-party libraries built on
asyncpg's pool, other than the two ORMs whose suites CI runs.

Piccolo ORM's and PgQueuer's own test suites ran once on asyncpg's pool and
once with ``asyncpg.create_pool`` rebound to ``safepool.create_pool`` (the
recipe of docs/migration.md), with the same outcome for every test (counts
in the review's report). No divergence was found, so nothing here is an
xfail: each test below replays, on both pools, the way one of those
libraries drives the pool, where no other test of ours did it that way, and
pins the outcome both pools give.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import MakePool

BOTH = ["asyncpg", "safepool"]


@pytest.mark.asyncio
@pytest.mark.parametrize("flavour", BOTH)
async def test_pgqueuer_listener_lease_held_then_reset_and_released(make_pool: MakePool, flavour: str) -> None:
    """PgQueuer's ``AsyncpgPoolDriver`` (pgqueuer/adapters/drivers/asyncpg.py)
    keeps one ``await pool.acquire()`` for its LISTEN callbacks while the
    other queries, its NOTIFYs among them, run through ``pool.execute()``;
    on exit it calls ``reset()`` on the proxy and then ``pool.release()``.
    On both pools the held lease gets the notification, and the connection
    goes back listening on nothing: the next leases see no channel and the
    callback is not called again."""
    pool = await make_pool(min_size=2, max_size=2)
    channel = f"sp_s61_{uuid.uuid4().hex[:8]}"
    received: list[str] = []
    got = asyncio.Event()

    def callback(*args: Any) -> None:
        received.append(args[-1])
        got.set()

    listener = await pool.acquire()
    await listener.add_listener(channel, callback)
    await pool.execute("SELECT pg_notify($1, $2)", channel, "first")
    await asyncio.wait_for(got.wait(), 5)
    assert received == ["first"]

    await listener.reset()
    await pool.release(listener)
    async with pool.acquire() as a, pool.acquire() as b:
        assert await a.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert await b.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        await a.execute("SELECT pg_notify($1, $2)", channel, "second")
        # A round trip on each: a connection still listening would have
        # delivered the notification before answering.
        await a.fetchval("SELECT 1")
        await b.fetchval("SELECT 1")
    assert received == ["first"]
    assert (pool.get_size(), pool.get_idle_size()) == (2, 2)


@pytest.mark.asyncio
@pytest.mark.parametrize("flavour", BOTH)
async def test_piccolo_transaction_on_an_awaited_acquire(make_pool: MakePool, flavour: str, pg_dsn: str) -> None:
    """Piccolo's ``PostgresTransaction`` (piccolo/engine/postgres.py) takes
    ``await pool.acquire()`` (no ``async with``), starts
    ``con.transaction()``, may set savepoints by SQL, and on the way out
    commits or rolls back and hands the proxy to ``pool.release()``. On
    both pools the committed row stays, the rolled-back one (after a
    ROLLBACK TO SAVEPOINT inside it) does not, and each release leaves the
    connection idle outside any transaction."""
    table = f"sp_s61_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE TABLE {table} (n int)")
    try:
        pool = await make_pool(min_size=1, max_size=2)

        con = await pool.acquire()
        tr = con.transaction()
        await tr.start()
        await con.execute(f"INSERT INTO {table} VALUES (1)")
        await tr.commit()
        await pool.release(con)

        con = await pool.acquire()
        tr = con.transaction()
        await tr.start()
        await con.execute(f"INSERT INTO {table} VALUES (2)")
        await con.execute("SAVEPOINT savepoint_1")
        await con.execute(f"INSERT INTO {table} VALUES (3)")
        await con.execute("ROLLBACK TO SAVEPOINT savepoint_1")
        await tr.rollback()
        await pool.release(con)

        async with pool.acquire() as con:
            assert not con.is_in_transaction()
            assert await con.fetchval("SELECT txid_current_if_assigned()") is None
        assert [r["n"] for r in await admin.fetch(f"SELECT n FROM {table} ORDER BY n")] == [1]
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("flavour", BOTH)
async def test_a_pool_per_asyncio_run_in_a_worker_thread(flavour: str, pg_dsn: str, app_name: str,
                                                          server_count: Any) -> None:
    """Piccolo's ``run_sync()`` (piccolo/utils/sync.py) runs its coroutine
    with ``asyncio.run()``, in a worker thread when a loop is already
    running; an app that starts its pool inside such a run creates, uses
    and closes a pool on a fresh loop each time. On both pools each run's
    20 concurrent queries succeed (up to max_size connections), and once
    ``close()`` returned in that loop the server has none of its backends
    left."""
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool

    def run_once(offset: int) -> list[int]:
        async def main() -> list[int]:
            pool = await factory(pg_dsn, min_size=1, max_size=4,
                                 server_settings={"application_name": app_name})
            try:
                return list(await asyncio.gather(*(pool.fetchval("SELECT $1::int", offset + n) for n in range(20))))
            finally:
                await pool.close()

        return asyncio.run(main())

    for offset in (0, 100, 200):
        assert await asyncio.to_thread(run_once, offset) == [offset + n for n in range(20)]
        assert await server_count(app_name) == 0
