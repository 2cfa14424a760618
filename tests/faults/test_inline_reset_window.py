"""A connection lost during the reset a release drives in the caller's task
(the common case: one message, no pool task).

asyncpg's pool detaches the proxy after its reset (``PoolConnectionHolder.
_release()``, 0.29-0.32), so a termination listener the lease registered,
called because the connection died during that reset, gets the lease's
proxy. safepool's release kept the proxy attached only for a reset run in
a pool task (review h236, s73); the inline reset handed the listener the
asyncpg ``Connection`` (docs/reliability.md listed the window as open
until s78). Both pools, same scenario, same outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

import safepool

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


class _SwallowSignal(FaultProxy):
    """A fault proxy that tells when it first swallows client bytes (the
    release's reset, sent into the black hole)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.swallowed = asyncio.Event()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: Any) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if self.blackhole:
                pair.tainted = True
                self.swallowed.set()
                continue
            writer.write(data)
            await writer.drain()


async def _make_pool(kind: str, dsn: str) -> Any:
    if kind == "asyncpg":
        return await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    return await safepool.create_pool(dsn, min_size=0, max_size=1)


@pytest.mark.parametrize("kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize("how", ["release", "async-with"])
async def test_a_connection_lost_during_the_inline_reset_hands_listeners_the_proxy(
    running: Cluster, kind: str, how: str
) -> None:
    async with _SwallowSignal(running.port) as proxy:
        pool = await _make_pool(kind, running.dsn(port=proxy.port))
        try:
            loop = asyncio.get_running_loop()
            called: asyncio.Future[Any] = loop.create_future()
            held: list[Any] = []

            async def lease() -> None:
                if how == "release":
                    con = await pool.acquire()
                    held.append(con)
                    con.add_termination_listener(lambda c: called.done() or called.set_result(c))
                    assert await con.fetchval("SELECT 1") == 1
                    proxy.blackhole = True  # the reset goes unanswered
                    await pool.release(con)
                else:
                    async with pool.acquire() as con:
                        held.append(con)
                        con.add_termination_listener(lambda c: called.done() or called.set_result(c))
                        assert await con.fetchval("SELECT 1") == 1
                        proxy.blackhole = True

            task = asyncio.ensure_future(lease())
            await asyncio.wait_for(proxy.swallowed.wait(), 5)  # the reset is under way
            assert not task.done()
            proxy.heal()  # the connection is reset (RST) mid-reset
            got = await asyncio.wait_for(called, 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            assert got is held[0], f"the termination listener got {type(got).__name__}, not the lease's proxy"
            # The pool serves again (a new connection).
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 2") == 2
            await asyncio.wait_for(pool.close(), 10)
        finally:
            pool.terminate()
