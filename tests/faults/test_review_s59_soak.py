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
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

import safepool

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


async def _count(admin: asyncpg.Connection, app_name: str, extra: str = "") -> int:
    return int(
        await admin.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1{extra}", app_name)
    )


@pytest_asyncio.fixture
async def admin(running: Cluster, app_name: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(running.admin_dsn)
    try:
        yield con
    finally:
        # A backend left running its pg_sleep (the bug) must not outlive the test.
        await con.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        await con.close()


@pytest.mark.xfail(
    strict=True,
    reason="an RST while the release waits for a cancelled statement (asyncpg's cancel request still in flight, "
    "killed by the same reset) frees the slot with no cancel request of the pool's own: the backend runs on "
    "beside the replacement (max_size + 1 on the server)",
)
@pytest.mark.parametrize("how", ["task_cancel", "command_timeout"])
async def test_reset_while_release_waits_for_a_cancelled_statement_keeps_max_size(
    running: Cluster, admin: asyncpg.Connection, app_name: str, how: str
) -> None:
    async with FaultProxy(running.port) as proxy:
        options = {"command_timeout": 0.3} if how == "command_timeout" else {}
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1,
            server_settings={"application_name": app_name}, **options,
        )
        try:

            async def lease() -> None:
                async with pool.acquire() as con:
                    await con.execute("SELECT pg_sleep(5)")

            holder = asyncio.create_task(lease())
            async with asyncio.timeout(10):
                while not await _count(admin, app_name, " AND state = 'active'"):
                    await asyncio.sleep(0.005)
            proxy.latency = 0.2  # asyncpg's cancel request is held in the proxy...
            if how == "task_cancel":
                holder.cancel()  # asyncpg sends a cancel request; the release waits for its answer
                await asyncio.sleep(0.02)
            else:
                await asyncio.sleep(0.35)  # command_timeout: asyncpg's TimeoutError, its cancel request sent
            assert pool.stats().resetting == 1  # the release waits for the cancelled statement
            proxy.reset_all()  # ... and dies with the lease's connection (RST)
            proxy.latency = 0.0
            with contextlib.suppress(BaseException):
                await holder

            seen = []
            for _ in range(3):  # (a lease may meet a connection lost under it: another one then)
                try:
                    async with asyncio.timeout(5), pool.acquire() as con:
                        await con.fetchval("SELECT 1")
                        seen.append(await _count(admin, app_name))
                        break
                except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError):
                    continue
            assert seen, "no lease after the reset"
            assert seen[-1] <= 1, (
                f"the server counts {seen[-1]} backends for a pool of max_size=1 while the replacement is leased: "
                f"{await _count(admin, app_name, ' AND state = ' + chr(39) + 'active' + chr(39))} still run pg_sleep"
            )
        finally:
            await asyncio.wait_for(pool.close(), 10)
