"""Review h249: the close's wait for a statement (``_workers.statement_ended``)
ends, once the statement ended, with an ``await`` of its cancel request
still on its way (``_once_free``'s ``finally``, _workers.py:373-375). A
call of the lease that begins meanwhile is not looked for again:
``_workers.close`` calls asyncpg's ``close()`` right after (_workers.py:537),
which meets that call: session s75's kind, again (asyncpg 0.32 resolves the
call with ``None`` when the server ends the connection meanwhile).

Such a call: one that passed the lease's proxy before the release and
awaits something of its own before asyncpg sends it (here a
``connection_class`` whose ``execute()`` awaits first: instrumentation, a
rate limiter). asyncpg's pool closes at once and the call, sent later, is
refused (``InterfaceError``: the connection is closed).

Deterministic: a proxy relays the first cancel request at once but the
server's end of it 0.5 s late (the request's socket closes late: a slow
network back), and stalls every later new connection (the cancel request
of asyncpg's ``close()``), until the test terminates the backend.

Fixed in s75: the close looks for calls of the lease again right before asyncpg's close() (_workers._calls_ended).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import in_pg_sleep_on

from ._pg import Cluster
from ._proxy import FaultProxy, _Pair, swallow
from .test_review_s75_close_meets_call import SLOW_TABLE

pytestmark = [pytest.mark.asyncio]


class LateEndProxy(FaultProxy):
    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.count = 0
        self.first: asyncio.StreamWriter | None = None
        self.stalled = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        if self.count == 1:
            self.first = writer
        if self.count >= 3:
            self._held.append(writer)
            self.stalled.set()
            await swallow(reader)
            return
        await super()._handle(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair) -> None:
        await super()._relay(reader, writer, pair)
        if writer is pair.client and writer is not self.first:
            await asyncio.sleep(0.5)  # (the server's end of the cancel request, late)

    async def close(self) -> None:
        for writer in self._held:
            writer.transport.abort()
        await super().close()


class AwaitsFirst(asyncpg.Connection):  # type: ignore[misc]
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if query.startswith("INSERT"):
            await asyncio.sleep(0.15)
        return await super().execute(query, *args, timeout=timeout)


async def _scenario(create_pool: Any, cluster: Cluster, admin: Any, app_name: str) -> tuple[Any, Any, int, bool]:
    await admin.execute(SLOW_TABLE)
    tag = f"{app_name}-h249-during"
    terminated = False
    async with LateEndProxy(cluster.port) as proxy:
        pool = await create_pool(
            cluster.dsn(port=proxy.port), min_size=0, max_size=1, connection_class=AwaitsFirst,
            server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            first = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(30)"))
            await in_pg_sleep_on(admin, pid)
            second = asyncio.ensure_future(con.execute(f"INSERT INTO s75_writes VALUES ('{tag}')"))
            await asyncio.sleep(0)
            await pool.expire_connections()
            release = asyncio.ensure_future(pool.release(con))
            await asyncio.wait(
                {second, asyncio.ensure_future(proxy.stalled.wait())}, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
            if proxy.stalled.is_set() and not second.done():
                terminated = await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            outcomes = []
            for task in (first, second):
                try:
                    outcomes.append(await asyncio.wait_for(task, 10))
                except Exception as error:  # noqa: BLE001
                    outcomes.append(error)
            await asyncio.wait({release}, timeout=10)
        finally:
            pool.terminate()
    rows = await admin.fetchval("SELECT count(*) FROM s75_writes WHERE tag = $1", tag)
    return outcomes[0], outcomes[1], rows, terminated


async def test_asyncpg_pool_refuses_the_late_call(running: Cluster, admin: Any, app_name: str) -> None:
    first, second, rows, terminated = await _scenario(asyncpg.create_pool, running, admin, app_name)
    assert rows == 0 and not terminated
    assert isinstance(first, (asyncpg.QueryCanceledError, asyncpg.InternalClientError)), first
    assert isinstance(second, asyncpg.InterfaceError) and "closed" in str(second), second


async def test_a_call_begun_during_the_wait_is_not_reported_done(
    running: Cluster, admin: Any, app_name: str
) -> None:
    first, second, rows, terminated = await _scenario(safepool.create_pool, running, admin, app_name)
    assert isinstance(first, asyncpg.QueryCanceledError), first
    assert rows == 0
    assert isinstance(second, Exception), f"uncommitted INSERT reported done: {second!r} (terminated={terminated})"
