"""pg_terminate_backend of idle and of leased connections, at random, during
a load loop."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest

import safepool

from ._harness import Ledger, ServerSampler, assert_books_balance, closing, loop_errors, scale
from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

MAX_SIZE = 6


async def test_terminate_backends_at_random_under_load(running: Cluster, app_name: str, report: Any) -> None:
    rng = random.Random(9)
    duration = scale(4.0, 20.0)
    pool = await safepool.create_pool(
        running.dsn(),
        min_size=2,
        max_size=MAX_SIZE,
        acquire_timeout=2.0,
        server_settings={"application_name": app_name},
    )
    ledger = Ledger()
    killed: Counter[str] = Counter()
    handed_out_closed: list[object] = []
    victims: list[int] = []
    deadline = time.monotonic() + duration

    async def client(i: int) -> None:
        local = random.Random(i)
        while time.monotonic() < deadline:
            try:
                async with pool.acquire() as con:
                    if con.is_closed():
                        handed_out_closed.append(con)
                    if local.random() < 0.5:
                        await con.fetchval("SELECT pg_sleep(0.01)")
                    else:
                        async with con.transaction():
                            await con.execute("SELECT pg_sleep(0.005)")
                            await con.execute("SELECT pg_sleep(0.005)")
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)
                await asyncio.sleep(0.01)

    async def killer(admin: asyncpg.Connection) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.02, 0.08))
            rows = await admin.fetch(
                "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
                app_name,
            )
            if not rows:
                continue
            victim = rng.choice(rows)
            if await admin.fetchval("SELECT pg_terminate_backend($1)", victim["pid"]):
                victims.append(victim["pid"])
                # "idle": in the pool's stack (or between statements of a
                # lease); "active" / "idle in transaction": leased, mid-work.
                killed[victim["state"] or "unknown"] += 1

    admin = await asyncpg.connect(running.admin_dsn)
    try:
        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                tasks = [asyncio.create_task(client(i)) for i in range(4 * MAX_SIZE)]
                await killer(admin)
                # Until every victim has exited (its FATAL and EOF sent), so
                # that assert_books_balance's "the server sees the pool's
                # connections" waits for the pool to have read the last
                # kill's EOF. Without it the books could balance with the last
                # victim still counted on both sides, and the final queries
                # got it between its FATAL and its EOF (InternalClientError
                # "another operation (2) is in progress", as on asyncpg's
                # pool: ci-130, 2026-12-04).
                async with asyncio.timeout(10):
                    while await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", victims
                    ):
                        await asyncio.sleep(0.01)
                async with asyncio.timeout(10):
                    await asyncio.gather(*tasks)
                await assert_books_balance(pool, sampler)
                # Still serving, and every connection it keeps is alive.
                async with asyncio.timeout(5):
                    results = await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(3 * MAX_SIZE)))
                assert results == [1] * (3 * MAX_SIZE)
            assert not unhandled, unhandled
    finally:
        await admin.close()
    ledger.check()
    stats = pool.stats()
    report(
        killed=dict(killed),
        ledger=ledger.summary(),
        max_server_connections=sampler.max_seen,
        connections_opened=stats.connections_opened,
        resets_failed=stats.resets_failed,
    )
    assert not handed_out_closed, "the pool handed out a connection it knew was closed"
    assert sum(killed.values()) >= 20
    assert killed["idle"] > 0 and killed["active"] + killed["idle in transaction"] > 0
    assert sampler.max_seen <= MAX_SIZE, sampler.samples
    # Most work still succeeds: a kill costs at most the operations on that connection.
    assert ledger.ok > 5 * sum(killed.values())


_ = safepool
