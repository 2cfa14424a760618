"""The examples of docs/best-practices.md and docs/runbook.md, run against a real
PostgreSQL by tests/integration/test_docs_examples.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import safepool

SCHEMA = """
CREATE TABLE IF NOT EXISTS sp_docs_accounts (
    id integer PRIMARY KEY,
    balance integer NOT NULL CHECK (balance >= 0)
)
"""


# --8<-- [start:async_with]
async def account_balance(pool: safepool.Pool, account_id: int) -> int | None:
    # Released when the block ends: normally, by return, by an exception or
    # by cancellation of the task.
    async with pool.acquire() as con:
        return await con.fetchval("SELECT balance FROM sp_docs_accounts WHERE id = $1", account_id)
# --8<-- [end:async_with]


# --8<-- [start:finally]
async def account_balance_without_async_with(pool: safepool.Pool, account_id: int) -> int | None:
    con = await pool.acquire()
    try:  # immediately after the acquire: nothing may run in between
        return await con.fetchval("SELECT balance FROM sp_docs_accounts WHERE id = $1", account_id)
    finally:
        await pool.release(con)
# --8<-- [end:finally]


# --8<-- [start:transaction]
class InsufficientFunds(Exception):
    pass


async def transfer(pool: safepool.Pool, source: int, target: int, amount: int) -> None:
    async with pool.acquire() as con, con.transaction():
        balance = await con.fetchval(
            "SELECT balance FROM sp_docs_accounts WHERE id = $1 FOR UPDATE", source
        )
        if balance is None or balance < amount:
            # Leaving the block with an exception rolls back, then releases.
            raise InsufficientFunds(f"account {source} has {balance}, needs {amount}")
        await con.execute("UPDATE sp_docs_accounts SET balance = balance - $2 WHERE id = $1", source, amount)
        await con.execute("UPDATE sp_docs_accounts SET balance = balance + $2 WHERE id = $1", target, amount)
# --8<-- [end:transaction]


# --8<-- [start:long_work]
async def publish_balances(pool: safepool.Pool, post: Callable[[dict[str, int]], Awaitable[None]]) -> dict[str, int]:
    # Read what you need, give the connection back, then do the slow part.
    async with pool.acquire() as con:
        rows = await con.fetch("SELECT id, balance FROM sp_docs_accounts ORDER BY id")
    summary = {"accounts": len(rows), "total": sum(row["balance"] for row in rows)}
    await post(summary)  # an HTTP call: no connection is held while it waits
    return summary


async def export_accounts(pool: safepool.Pool, write: Callable[[int, int], Awaitable[None]]) -> int:
    # A job that must hold its connection for long says so: this lease may
    # last 10 minutes, whatever the pool's lease_timeout.
    count = 0
    async with pool.acquire(lease_timeout=600) as con, con.transaction():
        async for row in con.cursor("SELECT id, balance FROM sp_docs_accounts ORDER BY id", prefetch=500):
            await write(row["id"], row["balance"])
            count += 1
    return count
# --8<-- [end:long_work]


# --8<-- [start:listen]
class Notifications:
    """LISTEN on a connection of its own, outside the pool."""

    def __init__(self, dsn: str, channel: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self._con: asyncpg.Connection | None = None

    async def __aenter__(self) -> Notifications:
        self._con = await asyncpg.connect(self.dsn)
        await self._con.add_listener(self.channel, self._on_notification)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._con is not None:
            await self._con.close()

    def _on_notification(self, con: Any, pid: int, channel: str, payload: str) -> None:
        self.received.put_nowait(payload)


async def notify(pool: safepool.Pool, channel: str, payload: str) -> None:
    # Sending needs no session state: any pooled connection will do.
    await pool.execute("SELECT pg_notify($1, $2)", channel, payload)
# --8<-- [end:listen]


# --8<-- [start:pgbouncer]
def create_pool_behind_pgbouncer(dsn: str) -> safepool.Pool:
    return safepool.create_pool(
        dsn,  # PgBouncer's address, in transaction pooling mode
        name="app",
        min_size=2,
        max_size=20,
        statement_cache_size=0,  # asyncpg's named prepared statements do not survive transaction pooling
        reset_mode="auto",  # no reset after plain queries; ROLLBACK, or RESET ALL after a SET (needs safepool[auto])
        lease_timeout=30.0,
    )
# --8<-- [end:pgbouncer]


# --8<-- [start:lifetime]
def create_pool_that_follows_failovers(dsn: str) -> safepool.Pool:
    return safepool.create_pool(
        dsn,  # a DNS name that moves to the new primary on failover
        name="app",
        min_size=2,
        max_size=20,
        max_lifetime=1800.0,  # seconds: each connection is replaced after 27-30 minutes
        tcp_keepalive=safepool.TcpKeepalive(idle=30, interval=10, count=3, user_timeout=30),
        lease_timeout=30.0,
    )
# --8<-- [end:lifetime]


# --8<-- [start:shutdown]
async def close_pool_within(pool: safepool.Pool, grace: float) -> bool:
    """At shutdown (SIGTERM; Kubernetes gives 30 s by default): True if every
    connection came back within ``grace`` seconds. Past it, close() is
    cancelled and terminates the pool: a request still holding a connection
    gets ConnectionDoesNotExistError from the statement it was running, else
    asyncpg's InterfaceError from its next call or from leaving
    con.transaction() (as on asyncpg's pool), and the safepool logger's
    close_cut_short warning names where they acquired it."""
    try:
        async with asyncio.timeout(grace):
            await pool.close()
    except TimeoutError:
        return False
    return True
# --8<-- [end:shutdown]


# --8<-- [start:errors]
BUSY = (safepool.PoolOverloadedError, safepool.PoolTimeoutError, safepool.ServerUnavailableError)


async def handle_balance_request(pool: safepool.Pool, account_id: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for GET /accounts/{id}/balance."""
    try:
        async with pool.acquire(timeout=2.0) as con:
            balance = await con.fetchval("SELECT balance FROM sp_docs_accounts WHERE id = $1", account_id)
    except BUSY:
        # The pool is saturated or the database unreachable: say so quickly,
        # and let the client (or the load balancer) retry.
        return 503, {"error": "database busy, retry later"}
    if balance is None:
        return 404, {"error": "no such account"}
    return 200, {"account": account_id, "balance": balance}
# --8<-- [end:errors]


# --8<-- [start:leases_endpoint]
def describe_leases(pool: safepool.Pool) -> list[dict[str, Any]]:
    """Who holds the pool's connections now: serve it on an admin endpoint."""
    return [
        {
            "lease": info.id,
            "held_seconds": round(info.age, 3),
            "expires_in": None if info.deadline_in is None else round(info.deadline_in, 3),
            "task": info.task_name,
            "acquired_at": info.acquired_at,  # needs leak_warning_after or capture_stack=True
        }
        for info in pool.leases()
    ]
# --8<-- [end:leases_endpoint]
