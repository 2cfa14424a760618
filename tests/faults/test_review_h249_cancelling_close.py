"""Review h249: the s75 fix (``_workers.close`` waits for a call in flight
before asyncpg's graceful ``close()``) is skipped when asyncpg is
cancelling an earlier statement of the lease (``not
_pg.is_cancelling(con)`` in ``_workers.close``'s first test).

Scenario: call A of a lease times out (asyncpg's own cancellation, its
cancel request under way); call B of the lease starts in another task
(asyncpg queues it behind the cancellation: ``protocol.query`` awaits the
cancel waiter); the lease, of an expired generation, is released.

asyncpg's pool closes at once: ``Protocol.close`` marks the protocol
closing before it waits for the cancellation, and B, resumed after it, is
refused (``InterfaceError: connection is closed``): nothing is written.

safepool's close first waits for the cancellation
(``_internals.wait_for_cancellation``), then calls ``con.close()``
without looking again: B, whose wait on the same cancel waiter was queued
first, has sent its INSERT by then, and the close meets it. Its
``_drain_cancels`` cancels B; if the server ends the connection while that
cancel request is under way (here: a proxy stalls it, and the test
terminates the backend), asyncpg resolves B's waiter with ``None``: the
INSERT reported done, nothing committed (session s75's kind).

Deterministic: the proxy holds A's cancel request until the release has
begun (so the close finds the cancellation under way), and stalls every
later new connection (B's cancel request from ``close()``).

Fixed in s75: after asyncpg's cancellation the close looks for calls of the lease again before asyncpg's close() (_workers._calls_ended).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import outcome_of

from ._pg import Cluster
from ._proxy import FaultProxy, swallow
from .test_review_s75_close_meets_call import SLOW_TABLE

pytestmark = [pytest.mark.asyncio]


class GatedProxy(FaultProxy):
    """New connection #1 (the pool's) relays; #2 (A's cancel request) waits
    for ``gate`` and then relays; #3 on (B's cancel request) are accepted
    and never relayed (``stalled`` set at the first)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.count = 0
        self.gate = asyncio.Event()
        self.held = asyncio.Event()
        self.stalled = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        n = self.count
        if n == 2:
            self.held.set()
            await self.gate.wait()
        if n >= 3:
            self._writers.append(writer)
            self.stalled.set()
            await swallow(reader)
            return
        await super()._handle(reader, writer)

    async def close(self) -> None:
        self.gate.set()
        for writer in self._writers:
            writer.transport.abort()
        await super().close()


async def _scenario(
    create_pool: Any, cluster: Cluster, admin: Any, app_name: str, how: str
) -> tuple[Any, int, bool]:
    await admin.execute(SLOW_TABLE)
    tag = f"{app_name}-h249"
    stalled = False
    async with GatedProxy(cluster.port) as proxy:
        pool = await create_pool(
            cluster.dsn(port=proxy.port), min_size=0, max_size=1,
            server_settings={"application_name": app_name},
            max_queries=1 if how == "max_queries" else 50000,
        )
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            with pytest.raises(asyncio.TimeoutError):
                await con.fetchval("SELECT pg_sleep(30)", timeout=0.2)
            await asyncio.wait_for(proxy.held.wait(), 10)  # A's cancel request held: cancelling
            write = asyncio.create_task(con.execute(f"INSERT INTO s75_writes VALUES ('{tag}')"))
            for _ in range(3):
                await asyncio.sleep(0)  # (B waits behind the cancellation)
            if how != "max_queries":
                await pool.expire_connections()
            release = asyncio.create_task(pool.release(con, timeout=5 if how == "expired_timeout" else None))
            for _ in range(3):
                await asyncio.sleep(0)
            proxy.gate.set()  # A's cancellation ends
            # B's INSERT sleeps in the trigger and the close's cancel request
            # for it is stalled; or B was refused.
            done, _ = await asyncio.wait({write, asyncio.ensure_future(proxy.stalled.wait())},
                                         timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if proxy.stalled.is_set() and not write.done():
                stalled = True
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            outcome = await outcome_of(write)
            await asyncio.wait({release}, timeout=10)
        finally:
            pool.terminate()
    rows = await admin.fetchval("SELECT count(*) FROM s75_writes WHERE tag = $1", tag)
    return outcome, rows, stalled


HOW = ["expired", "expired_timeout", "max_queries"]


@pytest.mark.parametrize("how", HOW)
async def test_asyncpg_pool_refuses_the_queued_call(running: Cluster, admin: Any, app_name: str, how: str) -> None:
    """asyncpg's pool: the close comes first, B is refused, nothing written."""
    outcome, rows, stalled = await _scenario(asyncpg.create_pool, running, admin, app_name, how)
    assert rows == 0
    assert not stalled
    assert isinstance(outcome, asyncpg.InterfaceError) and "closed" in str(outcome), outcome


@pytest.mark.parametrize("how", HOW)
async def test_call_queued_behind_a_cancellation_is_not_reported_done(
    running: Cluster, admin: Any, app_name: str, how: str
) -> None:
    outcome, rows, stalled = await _scenario(safepool.create_pool, running, admin, app_name, how)
    assert rows == 0
    assert isinstance(outcome, Exception), f"uncommitted INSERT reported done: {outcome!r} (stalled={stalled})"
