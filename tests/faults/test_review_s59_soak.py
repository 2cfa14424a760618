"""Review s59, soak with random combined faults (helper-171): what the soak
found, reduced to a test on the fault suite's cluster and TCP proxy.

A connection whose socket is reset (RST: a proxy or load balancer restarts)
while its release waits for a cancelled statement's answer, and while
asyncpg's own cancel request for that statement is still on its way (the
reset kills it too), is freed at once with no cancel request of the pool's
own: its backend runs the statement to the end beside the replacement the
next lease opens, so the server counts max_size + 1 backends for the pool.
docs/design.md ("Slot states") and docs/reliability.md (an RST of a leased
connection whose backend runs pg_sleep gets a cancel request and its slot
counts until it is answered) promise the count; the same RST a moment
earlier, while the lease still runs its statement, keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until

from ._pg import Cluster, count_backends
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


async def _until_active(admin: asyncpg.Connection, app_name: str) -> None:
    async with asyncio.timeout(10):
        while not await count_backends(admin, app_name, " AND state = 'active'"):
            await asyncio.sleep(0.005)


async def _sleeping_lease(pool: safepool.Pool, admin: asyncpg.Connection, app_name: str) -> asyncio.Task[None]:
    """A task whose lease runs ``pg_sleep(5)``, returned once the server runs it."""

    async def lease() -> None:
        async with pool.acquire() as con:
            await con.execute("SELECT pg_sleep(5)")

    task = asyncio.create_task(lease())
    await _until_active(admin, app_name)
    return task


async def _backends_beside_a_replacement(pool: safepool.Pool, admin: asyncpg.Connection, app_name: str) -> int:
    """The backends the server counts for the pool while a new lease, on the
    slot's replacement, has run a statement."""
    for _ in range(3):  # (a lease may meet a connection lost under it: another one then)
        try:
            async with asyncio.timeout(5), pool.acquire() as con:
                await con.fetchval("SELECT 1")
                return await count_backends(admin, app_name)
        except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError):
            continue
    raise AssertionError("no lease after the reset")


async def _reset_thencount_backends(
    proxy: FaultProxy, holder: asyncio.Task[None], pool: safepool.Pool, admin: asyncpg.Connection, app_name: str,
) -> int:
    """RST every connection through ``proxy`` (the held cancel request
    too), let the lease's task end, then count the pool's backends beside a
    replacement's lease."""
    proxy.reset_all()
    proxy.latency = 0.0
    with contextlib.suppress(BaseException):
        await holder
    return await _backends_beside_a_replacement(pool, admin, app_name)


def _pool(cluster: Cluster, proxy: FaultProxy, app_name: str, **options: Any) -> Awaitable[safepool.Pool]:
    return safepool.create_pool(
        cluster.dsn(port=proxy.port), min_size=1, max_size=1, server_settings={"application_name": app_name},
        **options,
    )


@pytest.mark.parametrize("how", ["task_cancel", "command_timeout"])
async def test_reset_while_release_waits_for_a_cancelled_statement_keeps_max_size(
    running: Cluster, admin: asyncpg.Connection, app_name: str, how: str
) -> None:
    async with FaultProxy(running.port) as proxy:
        pool = await _pool(running, proxy, app_name, **({"command_timeout": 0.3} if how == "command_timeout" else {}))
        try:
            holder = await _sleeping_lease(pool, admin, app_name)
            before = proxy.accepted
            proxy.latency = 0.2  # asyncpg's cancel request is held in the proxy...
            if how == "task_cancel":
                holder.cancel()  # asyncpg sends a cancel request; the release waits for its answer
            # (command_timeout: asyncpg's TimeoutError at 0.3 s, its cancel request sent)
            # Until the cancel request's connection reached the proxy and the
            # release waits: the RST below must come while it is held.
            await until(lambda: proxy.accepted > before and pool.stats().resetting == 1)
            assert pool.stats().resetting == 1  # the release waits for the cancelled statement
            count = await _reset_thencount_backends(proxy, holder, pool, admin, app_name)  # (it dies with the connection)
            assert count <= 1, (
                f"the server counts {count} backends for a pool of max_size=1 while the replacement is leased: "
                f"{await count_backends(admin, app_name, ' AND state = ' + chr(39) + 'active' + chr(39))} still run pg_sleep"
            )
        finally:
            await asyncio.wait_for(pool.close(), 10)


async def test_reset_while_a_take_back_waits_for_its_cancel_keeps_max_size(
    running: Cluster, admin: asyncpg.Connection, app_name: str
) -> None:
    """The sibling in the lease timeout's take-back: the pool itself cancels
    the expired lease's statement (its cancel request held in the proxy),
    and an RST kills both sockets. The take-back's slot counts until a
    cancel request of the pool's own was delivered, so the replacement
    never runs beside the old backend."""
    async with FaultProxy(running.port) as proxy:
        pool = await _pool(running, proxy, app_name, lease_timeout=0.2)
        try:
            holder = await _sleeping_lease(pool, admin, app_name)
            before = proxy.accepted
            proxy.latency = 0.2  # the take-back's cancel request is held in the proxy...
            # Until the lease expired and the take-back's cancel request
            # reached the proxy (held there while the RST comes).
            await until(lambda: pool.stats().leases_expired >= 1 and proxy.accepted > before)
            count = await _reset_thencount_backends(proxy, holder, pool, admin, app_name)  # (it dies with the connection)
            assert count <= 1, f"the server counts {count} backends for a pool of max_size=1"
        finally:
            await asyncio.wait_for(pool.close(), 10)


async def test_reset_while_a_used_up_connection_waits_for_a_cancelled_statement_keeps_max_size(
    running: Cluster, admin: asyncpg.Connection, app_name: str
) -> None:
    """The sibling in the close of a connection at ``max_queries``: its
    release closes it (no reset) once the cancelled statement answers; an
    RST kills both sockets while asyncpg's cancel request is held. The slot
    counts until a cancel request of the pool's own was delivered."""
    async with FaultProxy(running.port) as proxy:
        pool = await _pool(running, proxy, app_name, max_queries=1)
        try:
            holder = await _sleeping_lease(pool, admin, app_name)
            before = proxy.accepted
            proxy.latency = 0.2
            holder.cancel()
            await until(lambda: proxy.accepted > before)  # asyncpg's cancel request, held in the proxy
            count = await _reset_thencount_backends(proxy, holder, pool, admin, app_name)
            assert count <= 1, f"the server counts {count} backends for a pool of max_size=1"
        finally:
            await asyncio.wait_for(pool.close(), 10)


async def test_reset_while_a_closing_pool_waits_for_a_cancelled_statement_leaves_no_backend(
    running: Cluster, admin: asyncpg.Connection, app_name: str
) -> None:
    """The sibling in the close path: close() waits for a lease; the lease's
    task is cancelled (asyncpg's cancel request held in the proxy), so its
    release closes the connection once the statement answers; an RST kills
    both sockets. close() returns only once the backend got a cancel request
    of the pool's own: no backend of the pool outlives close()."""
    async with FaultProxy(running.port) as proxy:
        pool = await _pool(running, proxy, app_name)
        closing: asyncio.Future[None] | None = None
        try:
            holder = await _sleeping_lease(pool, admin, app_name)
            closing = asyncio.ensure_future(pool.close())
            async with asyncio.timeout(5):
                while not pool.is_closing():
                    await asyncio.sleep(0.005)
            before = proxy.accepted
            proxy.latency = 0.2
            holder.cancel()  # asyncpg's cancel request, held in the proxy
            await until(lambda: proxy.accepted > before)
            proxy.reset_all()
            proxy.latency = 0.0
            with contextlib.suppress(BaseException):
                await holder
            await asyncio.wait_for(closing, 10)
            async with asyncio.timeout(2):
                # (a cancelled backend exits at once, but the server lists it
                # until it has: a few milliseconds)
                while (active := await count_backends(admin, app_name, " AND state = 'active'")):
                    await asyncio.sleep(0.01)
            assert active == 0
        finally:
            if closing is None:
                await asyncio.wait_for(pool.close(), 10)
